"""The report page: what a checkpoint retrieves, as a static HTML page that opens from disk.

``itr report CHECKPOINT --data DATA --split S --out DIR`` (or ``itr eval ... --report DIR``) evaluates every
pair (the evaluation job, with each query's top-5 list and its ground truth's rank) and writes ``DIR/index.html``:
the metrics at the top, then ``queries`` sampled queries each way, failures first (the ground truth not at rank
1; at most half the sample unless there are too few successes), worst first. Each query shows its top-5 with
the ground truth marked, and the ground truth's rank when it is further down. Images are thumbnails under
``DIR/images/`` (linked relatively: the folder can be moved or logged to MLflow whole) where the split has
pixels or ``images`` names a folder of its files by id; otherwise an image is shown by its id and captions.
For models with ``alignment`` (SCAN, TERAN, TGDT) on data with region boxes, the word x region weights of the
query's pair with its ground truth (and with the wrong first result) are drawn over the image's boxes
(``itr.report.align``). Ranks, lists and metrics all come from the evaluation job, so they agree with
``itr eval``.
"""
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from itr.eval.scores import rows
from itr.eval.stream import protocol_blocks

K = 5  # results shown per query


class ReportInputs(NamedTuple):
    """What the evaluation job hands over: the model and its embeddings of the split, the metrics, and the
    per-block top-K lists (``itr.eval.topk.TopK``, with the ground truths' ranks as ``gt_ranks``)."""
    model: object
    tokenizer: object
    split: object
    img: object
    cap: object
    metrics: dict
    tops: list
    protocol: str
    info: dict  # checkpoint, data, split, model (shown in the header)


def split_lists(tops, n, protocol, caps_per_image=5):
    """Per direction, split-wide (candidates (q, K), scores (q, K), 0-based ground-truth ranks (q,))."""
    out = {}
    for side, q_off, c_off in (("i2t", 1, caps_per_image), ("t2i", caps_per_image, 1)):
        cands, scores, ranks = [], [], []
        for (b0, _), top in zip(protocol_blocks(n, protocol, caps_per_image), tops):
            c = getattr(top, f"c_{side}")[:, :K]
            cands.append(np.where(c >= 0, c + c_off * b0, -1))
            scores.append(getattr(top, f"s_{side}")[:, :K])
            ranks.append(np.asarray(top.gt_ranks[0 if side == "i2t" else 1]))
        out[side] = (np.concatenate(cands), np.concatenate(scores), np.concatenate(ranks))
    return out


def sample_queries(ranks, n, seed=0):
    """Up to ``n`` query indices: failures (rank > 0) first, worst first, at most half of ``n`` unless there
    are too few successes; then successes. The same for a seed."""
    rng = np.random.default_rng(seed)
    fail, ok = np.flatnonzero(ranks > 0), np.flatnonzero(ranks == 0)
    n_fail = min(len(fail), max(n - len(ok), -(-n // 2)))
    n_ok = min(len(ok), n - n_fail)
    fail = rng.choice(fail, n_fail, replace=False) if n_fail else fail[:0]
    ok = np.sort(rng.choice(ok, n_ok, replace=False)) if n_ok else ok[:0]
    fail = fail[np.lexsort((fail, -ranks[fail]))]
    return [int(q) for q in np.concatenate([fail, ok])]


@torch.no_grad()
def _score(model, img, cap, i, js):
    """Scores of image ``i`` with captions ``js`` (on the model's device)."""
    from itr.eval.cascade import take

    p = next(model.parameters(), None)
    dev = p.device if p is not None else "cpu"
    idx = torch.as_tensor(js, dtype=torch.long)
    return model.score(rows(img, i, i + 1, dev), take(cap, idx, dev))[0].float().cpu().numpy()


class _Page:
    """Collects the page's query blocks; images and alignment figures are made as they are needed."""

    def __init__(self, inputs, out, images_dir):
        from itr.report.images import Thumbs

        self.x, self.out = inputs, Path(out)
        self.thumbs = Thumbs(inputs.split, self.out, images_dir)
        self.ids = inputs.split.ids or [f"{inputs.info.get('split', 'image')}:{i}" for i in range(inputs.split.num_images)]

    def image(self, i):
        caps = self.x.split.captions[5 * i:5 * i + 5]
        return {"row": i, "image_id": self.ids[i], "thumb": self.thumbs.get(i), "captions": caps}

    def alignments(self, i_gt, j, top1):
        from itr.report.align import figure

        figs = []
        for i, title in ((i_gt, "with its ground truth"), (top1, "with the first result (wrong)")):
            if i is None or i < 0:
                continue
            fig = figure(self.x, i, j, self.thumbs.get(i), title)
            if fig is not None:
                figs.append(fig)
        return figs

    def t2i(self, j, cands, scores, rank):
        gt = j // 5
        results = [{**self.image(int(i)), "score": float(s), "rank": r + 1, "gt": int(i) == gt}
                   for r, (i, s) in enumerate(zip(cands, scores)) if i >= 0]
        extra = None
        if rank >= K:
            extra = {**self.image(gt), "score": float(_score(self.x.model, self.x.img, self.x.cap, gt, [j])[0]),
                     "rank": int(rank) + 1, "gt": True}
        top1 = int(cands[0]) if rank > 0 else None
        return {"direction": "t2i", "query": {"caption": self.x.split.captions[j], "row": j}, "gt_rank": int(rank) + 1,
                "results": results, "gt_outside": extra, "alignments": self.alignments(gt, j, top1)}

    def i2t(self, i, cands, scores, rank):
        results = [{"row": int(j), "caption": self.x.split.captions[int(j)], "image_id": self.ids[int(j) // 5],
                    "score": float(s), "rank": r + 1, "gt": int(j) // 5 == i}
                   for r, (j, s) in enumerate(zip(cands, scores)) if j >= 0]
        extra = None
        if rank >= K:
            gts = list(range(5 * i, 5 * i + 5))
            s = _score(self.x.model, self.x.img, self.x.cap, i, gts)
            best = int(np.argmax(s))
            extra = {"row": gts[best], "caption": self.x.split.captions[gts[best]], "image_id": self.ids[i],
                     "score": float(s[best]), "rank": int(rank) + 1, "gt": True}
        return {"direction": "i2t", "query": self.image(i), "gt_rank": int(rank) + 1, "results": results,
                "gt_outside": extra, "alignments": []}


def write_report(inputs, out, queries=10, images_dir=None, seed=0):
    """Write ``out/index.html`` (and ``out/images/``); returns the page's path."""
    from itr.report.html import render

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    page = _Page(inputs, out, images_dir)
    lists = split_lists(inputs.tops, inputs.split.num_images, inputs.protocol)
    blocks = {}
    for side, make in (("t2i", page.t2i), ("i2t", page.i2t)):
        cands, scores, ranks = lists[side]
        blocks[side] = [make(q, cands[q], scores[q], ranks[q]) for q in sample_queries(ranks, queries, seed)]
        blocks[f"{side}_failures"] = int((ranks > 0).sum())
    html = render({**inputs.info, "protocol": inputs.protocol, "metrics": inputs.metrics,
                   "n_images": inputs.split.num_images, "n_captions": len(inputs.split.captions), **blocks})
    path = out / "index.html"
    path.write_text(html, encoding="utf-8")
    return path


def serve(folder, port=8000):
    """Serve ``folder`` on 127.0.0.1:``port`` (0: any free port); returns the server (``serve_forever`` it)."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    return ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Quiet, directory=str(folder)))
