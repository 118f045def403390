"""Caption tokenizers. Both map a caption to a list of ids and are picklable (loader workers).

``WordVocab`` is the GRU models' vocabulary, as SCAN's ``vocab.py``: lowercase, NLTK word
tokenization, words seen at least ``min_count`` times, ``<pad>=0 <start> <end> <unk>``,
captions encoded as ``<start> ... <end>``. ``HFTokenizer`` wraps a local transformers tokenizer.
"""
import json
from collections import Counter
from pathlib import Path
from typing import Iterable, List

SPECIALS = ["<pad>", "<start>", "<end>", "<unk>"]


def word_tokenize(caption: str) -> List[str]:
    # preserve_line=True: no sentence splitter, so no punkt download is needed.
    from nltk.tokenize import word_tokenize as nltk_tokenize

    return nltk_tokenize(caption.lower(), preserve_line=True)


class WordVocab:
    def __init__(self, idx2word: List[str], max_words: int = 0):
        self.idx2word = list(idx2word)
        self.word2idx = {w: i for i, w in enumerate(self.idx2word)}
        if self.idx2word[: len(SPECIALS)] != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}")
        self.max_words = max_words
        self.pad_id = 0

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 4, max_words: int = 0):
        counts = Counter()
        for c in captions:
            counts.update(word_tokenize(c))
        # Sorted by frequency then word: the same captions always give the same ids.
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(SPECIALS + words, max_words=max_words)

    def __len__(self):
        return len(self.idx2word)

    def encode(self, caption: str) -> List[int]:
        unk = self.word2idx["<unk>"]
        toks = word_tokenize(caption)
        if self.max_words:
            toks = toks[: self.max_words]
        return [1] + [self.word2idx.get(t, unk) for t in toks] + [2]

    def decode(self, ids) -> str:
        return " ".join(self.idx2word[i] for i in ids if i > 2)

    def to_json(self):
        return {"word2idx": self.word2idx, "idx2word": {str(i): w for i, w in enumerate(self.idx2word)},
                "idx": len(self.idx2word)}

    def save(self, path):
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path, max_words=0):
        d = json.loads(Path(path).read_text())
        idx2word = [d["idx2word"][str(i)] for i in range(d["idx"])]
        return cls(idx2word, max_words=max_words)


class HFTokenizer:
    """A transformers tokenizer from a local directory ([CLS] ... [SEP], truncated)."""

    def __init__(self, path: str, max_words: int = 0):
        from transformers import AutoTokenizer

        self.path = str(path)
        self.tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.pad_id = self.tok.pad_token_id or 0
        limit = self.tok.model_max_length if self.tok.model_max_length < 100_000 else 512
        self.max_length = min(limit, max_words + 2) if max_words else limit

    def __len__(self):
        return len(self.tok)

    def encode(self, caption: str) -> List[int]:
        return self.tok(caption, truncation=True, max_length=self.max_length)["input_ids"]
