"""Recall@K, medr, meanr and rsum under the standard protocols (fartashf/vsepp ``evaluation.py``).

- ``1k`` / ``5k``: the whole split at once (Flickr30K 1K test; COCO 5K ``testall``).
- ``coco-5fold``: 5 folds of n/5 images (1,000 on COCO testall) and their captions, taken
  from the diagonal blocks of one matrix (as HREM does); every metric is the mean over
  folds, and rsum is the mean of the per-fold rsums. This is what vsepp#26 describes; the
  5-fold summary *printed* by vsepp/SCAN/TERAN/TGDT is wrong (vsepp PR #43), so we never
  derive rsum from anything but per-fold recalls.
"""
import numpy as np

from itr.eval.ranks import ranks_of

KEYS = ["i2t_R1", "i2t_R5", "i2t_R10", "i2t_medr", "i2t_meanr",
        "t2i_R1", "t2i_R5", "t2i_R10", "t2i_medr", "t2i_meanr", "rsum"]
PROTOCOLS = ("1k", "coco-5fold", "5k")


def recall_metrics(r_i2t, r_t2i):
    out = {}
    for side, r in (("i2t", np.asarray(r_i2t)), ("t2i", np.asarray(r_t2i))):
        for k in (1, 5, 10):
            out[f"{side}_R{k}"] = 100.0 * float((r < k).mean())
        out[f"{side}_medr"] = float(np.floor(np.median(r)) + 1)
        out[f"{side}_meanr"] = float(r.mean() + 1)
    out["rsum"] = sum(out[f"{s}_R{k}"] for s in ("i2t", "t2i") for k in (1, 5, 10))
    return {k: out[k] for k in KEYS}


def evaluate_sims(sims, protocol="1k", caps_per_image=5, chunk=1024):
    """Metrics of an (n_images, 5 n_images) similarity matrix; ``coco-5fold`` adds ``folds``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    n = sims.shape[0]
    if protocol != "coco-5fold":
        return recall_metrics(*ranks_of(sims, caps_per_image))
    if n % 5:
        raise ValueError(f"coco-5fold needs a number of images divisible by 5, got {n}")
    f = n // 5
    folds = [recall_metrics(*ranks_of(sims[i * f:(i + 1) * f, caps_per_image * i * f:caps_per_image * (i + 1) * f],
                                      caps_per_image)) for i in range(5)]
    return fold_mean(folds)


def fold_mean(folds):
    """Every metric as the mean over the folds (rsum: the mean of the per-fold rsums), the folds kept."""
    mean = {k: float(np.mean([fold[k] for fold in folds])) for k in KEYS}
    mean["folds"] = folds
    return mean


def format_table(metrics, title=None):
    """A small fixed-width recall table for terminals and logs."""
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'':6} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'medr':>6} {'meanr':>8}")
    for side, name in (("i2t", "i2t"), ("t2i", "t2i")):
        lines.append(f"{name:6} {metrics[side + '_R1']:7.1f} {metrics[side + '_R5']:7.1f} {metrics[side + '_R10']:7.1f} "
                     f"{metrics[side + '_medr']:6.1f} {metrics[side + '_meanr']:8.1f}")
    lines.append(f"rsum {metrics['rsum']:.1f}")
    return "\n".join(lines)
