from itr.data.text import SPECIALS, WordVocab, word_tokenize


def test_tokenization_is_lowercase_nltk():
    assert word_tokenize("A Dog, running.") == ["a", "dog", ",", "running", "."]


def test_vocab_min_count_specials_and_encoding(tmp_path):
    caps = ["a dog runs"] * 4 + ["a cat sleeps"] * 3 + ["The dog"]
    v = WordVocab.build(caps, min_count=4)
    assert v.idx2word[:4] == SPECIALS and v.pad_id == 0
    assert set(v.idx2word[4:]) == {"a", "dog", "runs"}  # cat/sleeps seen 3 times, the once
    ids = v.encode("A dog sleeps")
    assert ids[0] == v.word2idx["<start>"] and ids[-1] == v.word2idx["<end>"]
    assert ids[1:-1] == [v.word2idx["a"], v.word2idx["dog"], v.word2idx["<unk>"]]
    v.save(tmp_path / "vocab.json")
    w = WordVocab.load(tmp_path / "vocab.json")
    assert w.idx2word == v.idx2word and w.encode("a dog") == v.encode("a dog")


def test_vocab_is_deterministic_and_truncates():
    caps = ["b a c"] * 5 + ["a"] * 5
    assert WordVocab.build(caps, 1).idx2word == WordVocab.build(list(reversed(caps)), 1).idx2word
    assert len(WordVocab.build(caps, 1, max_words=2).encode("a b c a b")) == 4
