"""Sample text from a trained SparseBKLM, token by token: `sparsebk generate`.

    for ids in generate(model, prompt, max_new_tokens=50, temperature=0.8, top_k=40, seed=0):
        ...  # ids (B,): the next token of every sequence, as soon as it is drawn

The prompt (B, T) goes through `model.prefill` (the parallel scan), every new token through
`model.step` (constant work per token, whatever the context). Each draw: logits / temperature,
then top-k (the k likeliest tokens), then top-p (the smallest set of likeliest tokens whose
probability reaches p), then one sample from a `torch.Generator` seeded with `seed` on the
model's device: the same seed, model and device give the same tokens. temperature 0 is greedy.

`StreamDecoder` turns the tokens into text as they come, for any tokenizer of
sparsebk.data.tokenizers: it decodes a short window of recent ids and prints what the new id
added (the word tokenizer's spaces and line ends come out right), and holds back a byte or BPE
token that ends inside a UTF-8 character until the character is complete.
"""

from __future__ import annotations

import random
from typing import Iterator, Sequence

import torch

from sparsebk.data.tokenizers import Tokenizer, WordTokenizer

__all__ = ["generate", "sample_next", "check_sampling", "encode_prompt", "StreamDecoder"]


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None,
                   top_p: float | None) -> None:
    """ValueError naming the option for a value generation cannot use."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={max_new_tokens!r}: must be an integer >= 1")
    if not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"--temperature={temperature!r}: must be finite and >= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"--top-k={top_k!r}: must be an integer >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"--top-p={top_p!r}: must be in (0, 1]")


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """logits (B, V) -> token ids (B,) int64."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the likelier ones already reach p (the likeliest always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop).scatter(-1, order, drop)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             eos_id: int | None = None) -> Iterator[torch.Tensor]:
    """Yield (B,) new token ids, `max_new_tokens` times (fewer when `eos_id` is given and every
    sequence has drawn it). prompt: (B, T) int64 on the model's device; the model in eval mode.
    A model with learned positions needs T + max_new_tokens - 1 <= n_seq (checked first)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"the prompt must be token ids (B, T) with T >= 1, got shape "
                         f"{tuple(prompt.shape)}")
    c = model.config
    last = prompt.shape[1] + max_new_tokens - 1  # positions the model reads: 0..last-1
    if model.pos_emb is not None and last > c.n_seq:
        raise ValueError(
            f"{prompt.shape[1]} prompt tokens + {max_new_tokens} new ones need {last} positions, "
            f"more than this model's n_seq={c.n_seq} (learned absolute positions end there); "
            f"ask for at most {c.n_seq - prompt.shape[1] + 1} new tokens, or use a model "
            f"trained with pos_emb='none'")
    gen = torch.Generator(device=prompt.device)
    gen.manual_seed(seed if seed is not None else random.SystemRandom().randrange(2 ** 63))
    logits, state = model.prefill(prompt)
    logits = logits[:, -1]  # (B, V)
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for i in range(max_new_tokens):
        ids = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                          generator=gen)
        yield ids
        if eos_id is not None:
            done |= ids == eos_id
            if bool(done.all()):
                return
        if i + 1 < max_new_tokens:
            logits, state = model.step(ids, state)


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """The prompt's ids. Word tokenizer: words of the vocabulary only (an unknown one is an
    error, not a silent <unk>), an <eos> between lines and after a final newline only (the
    model continues the last line)."""
    if not text.strip():
        raise ValueError("the prompt is empty: give --prompt some text to continue")
    if not isinstance(tokenizer, WordTokenizer):
        ids = tokenizer.encode(text)
        if not ids:
            raise ValueError(f"the prompt {text!r} encodes to no tokens")
        return ids
    unknown = sorted({w for w in text.split() if w not in tokenizer.index})
    if unknown:
        shown = ", ".join(repr(w) for w in unknown[:10])
        more = f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
        raise ValueError(f"word(s) not in the model's vocabulary of {tokenizer.vocab_size}: "
                         f"{shown}{more}; use its words (write <unk> for an unknown one)")
    ids = tokenizer.encode(text)  # every non-blank line ends in <eos>
    if not text.endswith("\n"):
        ids = ids[:-1]
    return ids


class StreamDecoder:
    """push(id) -> the text that id adds; flush() -> what is still held back."""

    WINDOW = 8  # ids of context kept: more than a UTF-8 character's 4 bytes
    MAX_HELD = 4  # ids held back waiting for the rest of a character

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids = [int(i) for i in context][-self.WINDOW:]
        self.shown = len(self.ids)  # ids[:shown] are already printed

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") and len(self.ids) - self.shown < self.MAX_HELD:
            return ""  # likely the first bytes of a character: wait for the rest
        return self._emit(text)

    def flush(self) -> str:
        return self._emit(self.tokenizer.decode(self.ids)) if len(self.ids) > self.shown else ""

    def _emit(self, text: str) -> str:
        before = self.tokenizer.decode(self.ids[:self.shown])
        n = 0  # common prefix: the window's text normally extends what was printed
        while n < min(len(before), len(text)) and before[n] == text[n]:
            n += 1
        self.ids = self.ids[-self.WINDOW:]
        self.shown = len(self.ids)
        return text[n:]
