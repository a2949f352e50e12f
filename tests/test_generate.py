"""Sampling and `sparsebk generate` (sparsebk.inference.generate).

The sampler's filters (greedy, top-k, top-p) against hand-made distributions; generation with
a fixed seed is reproducible; greedy generation picks the argmax of the full forward at every
position (the streaming state carries the whole context); the streamed text equals the
tokenizer's decode of all ids for the word, byte and GPT-2 tokenizers, multi-byte characters
split over tokens included; the command line on an exported model prints the prompt and its
continuation, and refuses bad input with exit code 2 and a message.
"""

from __future__ import annotations

import pytest
import torch

from sparsebk.cli import main
from sparsebk.data.tokenizers import ByteTokenizer, WordTokenizer, get_tokenizer
from sparsebk.inference.export import Pretrained, export
from sparsebk.inference.generate import StreamDecoder, encode_prompt, generate, sample_next
from sparsebk.model.lm import LMConfig, SparseBKLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = "the company said it will buy the unit \n the unit said it will not sell the company \n"
WORDS = WordTokenizer.build(TEXT)


def _model(vocab_size: int, seed: int = 0, **over) -> SparseBKLM:
    torch.manual_seed(seed)
    model = SparseBKLM(LMConfig.preset("debug", vocab_size=vocab_size, n_seq=16, **over)).eval()
    with torch.no_grad():  # decisive logits: the init's scale makes them all nearly equal
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(10.0)
    return model


def _gen(model, prompt, n, **kw) -> list[int]:
    return [int(ids[0]) for ids in generate(model, torch.tensor([prompt]), n, **kw)]


# --- the sampler -----------------------------------------------------------------------------
def test_filters_keep_the_tokens_they_should():
    logits = torch.tensor([[0.5, 0.3, 0.2, 1e-9]]).log().expand(2000, 4)
    gen = torch.Generator().manual_seed(0)
    draw = lambda **kw: set(sample_next(logits, generator=gen, **kw).tolist())  # noqa: E731
    assert draw(temperature=0) == {0}
    assert draw(top_k=1) == {0}
    assert draw(top_k=2) == {0, 1}
    assert draw(top_p=0.5) == {0}  # token 0 alone reaches 0.5
    assert draw(top_p=0.6) == {0, 1}
    assert draw(top_p=0.95) == {0, 1, 2}
    assert draw() == {0, 1, 2}  # p = 1e-9 is not drawn in 2000 tries (P ~ 2e-6)
    counts = torch.bincount(sample_next(logits, top_k=2, generator=gen), minlength=4)
    assert abs(counts[0] / 2000 - 0.5 / 0.8) < 0.05  # renormalised over the kept tokens


def test_fixed_seed_reproduces_and_another_seed_differs():
    model = _model(WORDS.vocab_size)
    prompt = encode_prompt(WORDS, "the company said")
    a = _gen(model, prompt, 12, seed=7, temperature=1.5)
    assert a == _gen(model, prompt, 12, seed=7, temperature=1.5)
    assert a != _gen(model, prompt, 12, seed=8, temperature=1.5)


def test_greedy_generation_is_the_full_forward_argmax():
    model = _model(WORDS.vocab_size, bk_heads=2, bk_input_couplings=True)
    prompt = encode_prompt(WORDS, "the unit said")
    new = _gen(model, prompt, 16 - len(prompt) + 1, temperature=0)
    tokens = torch.tensor([prompt + new[:-1]])  # the last new token is never fed back
    with torch.no_grad():
        full = model(tokens)["logits"][0, len(prompt) - 1:]  # the logits each new token came from
    assert full.argmax(-1).tolist() == new


def test_context_limit_of_learned_positions_and_none():
    model = _model(WORDS.vocab_size)
    prompt = encode_prompt(WORDS, "the company said")  # 3 tokens; n_seq = 16
    assert len(_gen(model, prompt, 14, temperature=0)) == 14  # positions 0..15
    with pytest.raises(ValueError, match=r"n_seq=16.*at most 14 new tokens.*pos_emb='none'"):
        next(generate(model, torch.tensor([prompt]), 15))
    unbounded = _model(WORDS.vocab_size, pos_emb="none")
    assert len(_gen(unbounded, prompt, 40, seed=0)) == 40


def test_stop_at_eos():
    model = _model(WORDS.vocab_size, pos_emb="none")
    prompt = encode_prompt(WORDS, "the company said")
    free = _gen(model, prompt, 40, seed=3, temperature=2.0)
    assert WORDS.eos_id in free  # a hot sampler of an 11-word vocabulary draws <eos> soon
    stopped = _gen(model, prompt, 40, seed=3, temperature=2.0, eos_id=WORDS.eos_id)
    assert stopped == free[:free.index(WORDS.eos_id) + 1]


# --- prompts and streamed text -----------------------------------------------------------
def test_encode_prompt():
    assert encode_prompt(WORDS, "the unit said") == [WORDS.index[w] for w in "the unit said".split()]
    assert encode_prompt(WORDS, "the unit\nsaid\n")[-1] == WORDS.eos_id
    assert encode_prompt(WORDS, "the unit\nsaid").count(WORDS.eos_id) == 1
    for bad, msg in [("", "empty"), ("  \n", "empty"), ("the zebra said Company", r"'Company', 'zebra'")]:
        with pytest.raises(ValueError, match=msg):
            encode_prompt(WORDS, bad)
    assert encode_prompt(ByteTokenizer(), "hé") == [104, 195, 169]


def _streamed(tok, context, ids) -> str:
    dec = StreamDecoder(tok, context)
    return "".join(dec.push(i) for i in ids) + dec.flush()


@pytest.mark.parametrize("name", ["word", "byte", "gpt2"])
def test_streamed_text_equals_the_decode_of_all_ids(name):
    tok = WORDS if name == "word" else get_tokenizer(name)
    if name == "word":
        context, ids = encode_prompt(tok, "the company"), tok.encode(TEXT * 3)
    else:
        context = tok.encode("Zoë said: ")
        ids = tok.encode("naïve café — 日本語 🙂 ok\nthe end")
    whole, prefix = tok.decode(context + ids), tok.decode(context)
    assert _streamed(tok, context, ids) == whole[len(prefix):]
    if name == "byte":  # a character's bytes come out together, once complete
        dec = StreamDecoder(tok)
        assert [dec.push(b) for b in "🙂".encode()] == ["", "", "", "🙂"]


# --- the command line ----------------------------------------------------------------------
def _exported(tmp_path, tok, **over):
    model = _model(tok.vocab_size, **over)
    record = {"run_name": "test", "step": 0, "checkpoint": "(none)", "dataset_dir": "(none)",
              "val_rows": "all"}
    return str(export(Pretrained(model, tok, record, tmp_path), tmp_path / "model"))


def _run(capsys, *argv):
    rc = main(["generate", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_prints_the_prompt_and_its_continuation(tmp_path, capsys):
    folder = _exported(tmp_path, WORDS)
    args = ["--model", folder, "--prompt", "the company said", "--max-new-tokens", "8",
            "--seed", "5", "--temperature", "0.8", "--top-k", "5", "--top-p", "0.9"]
    rc, out, err = _run(capsys, *args)
    assert rc == 0 and err == "" and out.startswith("the company said")
    words = out[len("the company said"):].split()
    assert len(words) + out.count("\n") - 1 == 8 and set(words) <= set(WORDS.vocab)
    assert _run(capsys, *args)[1] == out  # same seed, same text
    rc, _, err = _run(capsys, "--model", folder, "--prompt", "the unit", "--max-new-tokens", "3")
    assert rc == 0 and "--seed" in err  # no seed given: the one drawn is printed


def test_cli_generates_past_n_seq_without_positions(tmp_path, capsys):
    folder = _exported(tmp_path, ByteTokenizer(), pos_emb="none")
    rc, out, _ = _run(capsys, "--model", folder, "--prompt", "héllo", "--max-new-tokens", "40",
                      "--seed", "0")
    assert rc == 0 and out.startswith("héllo")


def test_an_adaptive_head_exports_loads_and_generates(tmp_path, capsys):
    """A model with a two-level head (head_cutoff) goes through export and load_pretrained with
    its head's own weights, the same log-probabilities, and generates from the command line."""
    from sparsebk.inference.export import load_pretrained

    folder = _exported(tmp_path, ByteTokenizer(), head_cutoff=64)
    loaded = load_pretrained(folder)
    original = _model(ByteTokenizer().vocab_size, head_cutoff=64)
    assert loaded.model.config.head_cutoff == 64
    tokens = torch.tensor([list(b"the company said")])
    with torch.no_grad():
        want, got = original(tokens)["logits"], loaded.model(tokens)["logits"]
    assert torch.equal(got, want)
    assert (want.exp().sum(-1) - 1).abs().max() < 257 * torch.finfo(torch.float32).eps
    rc, out, _ = _run(capsys, "--model", folder, "--prompt", "the", "--max-new-tokens", "6",
                      "--seed", "1")
    assert rc == 0 and out.startswith("the")


@pytest.mark.parametrize("argv, needle", [
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "the zebra said"], "not in the model's vocabulary of 11: 'zebra'"),
    (["--prompt", "the unit", "--max-new-tokens", "0"], "--max-new-tokens=0: must be"),
    (["--prompt", "the unit", "--max-new-tokens", "16"], "at most 15 new tokens"),
    (["--prompt", "the unit", "--temperature", "-1"], "--temperature=-1.0"),
    (["--prompt", "the unit", "--top-p", "0"], "--top-p=0.0"),
    (["--prompt", "the unit", "--top-k", "0"], "--top-k=0"),
])
def test_cli_bad_input_exits_2_with_a_message(tmp_path, capsys, argv, needle):
    folder = _exported(tmp_path, WORDS)
    rc, out, err = _run(capsys, "--model", folder, *argv)
    assert rc == 2 and out == "" and needle in err, err


def test_cli_missing_model_folder(tmp_path, capsys):
    rc, _, err = _run(capsys, "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert rc == 2 and "nope" in err
