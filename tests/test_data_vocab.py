import pytest

from capkit.data.vocab import Vocabulary, tokenize
from capkit.types import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A Dog's toy, RED.  Two-dogs!") == ["a", "dog's", "toy", "red", "two", "dogs"]
    assert tokenize(" ... ") == []


def test_build_min_count_max_size_and_order():
    caps = ["a dog runs", "a dog sits", "a cat sits", "a bird"]
    vocab = Vocabulary.build(caps, min_count=2, max_size=100)
    assert vocab.itos == list(SPECIAL_TOKENS) + ["a", "dog", "sits"]  # by count, then alphabetical
    assert len(Vocabulary.build(caps, min_count=1, max_size=6)) == 6
    with pytest.raises(ValueError, match="special tokens"):
        Vocabulary.build(caps, max_size=4)


def test_encode_truncates_and_decode_stops_at_end():
    vocab = Vocabulary(["a", "dog"])
    ids = vocab.encode("A dog, a cat!", max_len=3)
    assert ids == [BOS_ID, 4, 5, 4, EOS_ID]
    assert vocab.encode("cat") == [BOS_ID, UNK_ID, EOS_ID]
    assert vocab.decode([BOS_ID, 4, UNK_ID, 5, EOS_ID, 4, PAD_ID]) == "a dog"


def test_save_load_roundtrip(tmp_path):
    vocab = Vocabulary.build(["a dog", "a cat"], min_count=1)
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json") == vocab
    (tmp_path / "bad.json").write_text('{"itos": ["a", "b"]}')
    with pytest.raises(ValueError, match="bad.json.*not a capkit vocabulary"):
        Vocabulary.load(tmp_path / "bad.json")
