"""Reference point for docs/results.md: a bag-of-words ridge regression on ../shared/data/f8k_pooled.

Captions -> binary bag of words (training vocabulary, min count 2) -> ridge regression onto the
L2-normalized image features; retrieval by cosine similarity, scored with itr's protocol code.

    python benchmarks/f8k_ridge_baseline.py [--data ../shared/data/f8k_pooled] [--alpha 10]
"""
import argparse

import numpy as np

from itr.data.precomp import open_precomp
from itr.data.text import word_tokenize
from itr.eval.metrics import evaluate_sims, format_table


def bow(caps, vocab):
    x = np.zeros((len(caps), len(vocab)), np.float32)
    for i, c in enumerate(caps):
        for w in word_tokenize(c):
            if w in vocab:
                x[i, vocab[w]] = 1.0
    return x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/f8k_pooled")
    ap.add_argument("--alpha", type=float, default=10.0)
    a = ap.parse_args()
    tr, te = open_precomp(a.data, "train"), open_precomp(a.data, "test")
    counts = {}
    for c in tr.captions:
        for w in set(word_tokenize(c)):
            counts[w] = counts.get(w, 0) + 1
    vocab = {w: i for i, w in enumerate(sorted(w for w, n in counts.items() if n >= 2))}
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    X = bow(tr.captions, vocab)
    Y = np.repeat(norm(np.asarray(tr.images[:, 0], np.float32)), 5, axis=0)
    W = np.linalg.solve(X.T @ X + a.alpha * np.eye(X.shape[1]), X.T @ Y)
    cap = norm(bow(te.captions, vocab) @ W + 1e-8)
    img = norm(np.asarray(te.images[:, 0], np.float32))
    print(format_table(evaluate_sims(img @ cap.T, "1k"), f"bag-of-words ridge (alpha {a.alpha}) on {a.data} test"))


if __name__ == "__main__":
    main()
