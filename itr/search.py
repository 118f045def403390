"""``itr search``: text -> image and image -> text over an index (``itr.index``), ranked with the model's score.

A query is embedded by the index's checkpoint (loaded again, and checked to be the version that built the
index). Models whose score is the inner product of their embeddings are searched directly (exact, in chunks,
or the index's FAISS index). Others take a shortlist of ``rerank`` candidates by their global vectors (TGDT's
global tokens, or the shortlist checkpoint's) and rerank it with their full score, the evaluation's cascade
(``itr.eval.cascade.rerank``); a model with no shortlist scores every gallery item.

A text query must say something the tokenizer can read: one whose words are all unknown to a word vocabulary
(another language, a typo of every word) would only match the <unk> embedding, and is refused.
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from itr.errors import ConfigError, DataError


@dataclass
class SearchRequest:
    """One ``itr search``: text queries, or one image of the index (``image``), or an image file."""
    index: str | Path
    texts: tuple = ()
    image: str | None = None  # an image id of the indexed split (as the dataset names it)
    image_file: str | Path | None = None  # a picture, for raw-image models
    k: int = 10
    rerank: int = 100  # shortlist length of models that rerank
    checkpoint: str | Path | None = None  # the index's checkpoint where it moved (the same version)
    exact: bool = False  # exact search even where the index has a FAISS index
    device: str = "cpu"


def content_ids(tokenizer, text):
    """The token ids of ``text`` that are neither special nor unknown."""
    ids = tokenizer.encode(text)
    if hasattr(tokenizer, "word2idx"):  # WordVocab: <pad> <start> <end> <unk> are 0..3
        return [i for i in ids if i > 3]
    tok = tokenizer.tok
    skip = set(tok.all_special_ids) | {tok.unk_token_id}
    return [i for i in ids if i not in skip]


def check_readable(tokenizer, text):
    if not text.strip():
        raise DataError("the text query is empty")
    if not content_ids(tokenizer, text):
        raise DataError(f"the model's tokenizer cannot read the query {text!r}: every word of it is unknown to its "
                        f"vocabulary ({len(tokenizer)} tokens), so it would match the <unk> embedding only. Write "
                        f"the query in the language and words of the training captions")


def _embed_texts(model, tokenizer, texts, device):
    from itr.eval.embed import embed_captions

    for t in texts:
        check_readable(tokenizer, t)
    return embed_captions(model, list(texts), tokenizer, 256, device)


@torch.no_grad()
def _embed_image_file(index, model, recipe, path, device):
    from itr.data.images import decode, eval_transform
    from itr.eval.embed import _float

    if index.manifest["data"]["image_key"] != "pixels":
        raise DataError(f"--image-file needs an index of a raw-image model; {index.root} holds a "
                        f"{index.manifest['model']} model that reads precomputed features: give one of its images "
                        f"with --image ID")
    p = Path(path)
    try:
        img = decode(p.read_bytes())
    except Exception as e:
        raise DataError(f"{path} is not a readable image ({type(e).__name__}: {e})") from None
    px = torch.from_numpy(eval_transform(img, recipe.data.image_size))[None].to(device)
    return _float(model.embed_images({"pixels": px}))


def _queries(req, index, model, tok, recipe, short):
    """(side searched, full query embedding, shortlist vectors of the queries, query descriptions)."""
    from itr.eval.embed import embed_captions
    from itr.eval.scores import rows

    if sum(bool(x) for x in (req.texts, req.image, req.image_file)) != 1:
        raise ConfigError("give text queries, or --image ID, or --image-file PATH (one of them)")
    src = index.source
    if req.texts:
        full = _embed_texts(model, tok, req.texts, req.device)
        glob = {"self": full, "self:global": model.global_vectors(full) if src == "self:global" else None}.get(src)
        if src == "shortlist":
            glob = short[0].global_vectors(embed_captions(short[0], list(req.texts), short[1], 256, req.device))
        return "images", full, glob, [{"text": t} for t in req.texts]
    if req.image:
        r = index.image_row(req.image)
        full, glob = index.embeddings("images")
        return "captions", rows(full, r, r + 1), (glob[r:r + 1] if glob is not None else None), \
            [{"image_id": req.image, "image_row": r}]
    full = _embed_image_file(index, model, recipe, req.image_file, req.device)
    glob = full if src == "self" else model.global_vectors(full) if src == "self:global" else None
    if src == "shortlist":
        glob = short[0].global_vectors(_embed_image_file(index, short[0], recipe, req.image_file, req.device))
    return "captions", full, glob, [{"image_file": str(req.image_file)}]


def _device(model):
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _oriented(score_fn, side, gallery, query):
    """(queries, gallery rows) scores: ``score`` takes (images, captions), both on the model's device."""
    if side == "images":
        return score_fn(gallery, query).float().t().cpu().numpy()
    return score_fn(query, gallery).float().cpu().numpy()


def _reranked(model, side, g_full, q_full, idx):
    """``model.score`` of each query with its shortlist (``idx``, (queries, K); -1: no candidate)."""
    from itr.eval.cascade import rerank

    valid = idx >= 0
    safe = np.where(valid, idx, np.maximum(idx[:, :1], 0))
    cand, empty = torch.from_numpy(safe), torch.zeros((0, 1), dtype=torch.long)
    pair = getattr(model, "pair_score", None)
    dev = _device(model)
    if side == "images":
        _, s = rerank(model.score, g_full, q_full, empty, cand, dev, pair_fn=pair)
    else:
        s, _ = rerank(model.score, q_full, g_full, cand, empty, dev, pair_fn=pair)
    return np.where(valid, s.numpy(), -np.inf).astype(np.float32)


@torch.no_grad()
def ranked(index, model, side, q_full, q_glob, k, rerank_k=100, exact=False):
    """(scores, gallery rows, how), each (queries, <= k): the queries' best ``side`` rows by the model's score."""
    from itr.ann import _merge, exact_topk, faiss_topk, scored_topk
    from itr.eval.scores import num_rows, rows

    g_full, g_glob = index.embeddings(side)
    n, name, src = num_rows(g_full), index.manifest["model"], index.source
    if src is None:
        dev = _device(model)
        q_dev = rows(q_full, 0, num_rows(q_full), dev)
        s, i = scored_topk(lambda lo, hi: _oriented(model.score, side, rows(g_full, lo, hi, dev), q_dev), n, k, 1024)
        return s, i, f"every one of the {n} {side} scored by {name}"
    kk = k if src == "self" else max(k, rerank_k)
    fi = None if exact else index.faiss_index(side)
    s, i = faiss_topk(fi, q_glob.float().numpy(), kk) if fi is not None else exact_topk(q_glob, g_glob, kk)
    how = f"FAISS {index.manifest['faiss']['params']['kind']}" if fi is not None else "exact search"
    if src == "self":
        return s, i, f"{how} over {n} {side}"
    s = _reranked(model, side, g_full, q_full, i)
    s, i = _merge(s, i, k)
    by = "its global tokens" if src == "self:global" else Path(index.manifest["shortlist"]["checkpoint"]["path"]).name
    return s, i, f"{how} over {n} {side} by {by}: top {kk} reranked by {name}"


def _rows(index, side, scores, ids, query):
    out = []
    for r, (s, i) in enumerate(zip(scores.tolist(), ids.tolist())):
        if i < 0 or not np.isfinite(s):
            continue
        if side == "images":
            out.append({"rank": r + 1, "score": s, "image_id": index.image_ids[i], "image_row": i,
                        "caption": index.captions[5 * i]})
        else:
            row = {"rank": r + 1, "score": s, "caption_row": i, "caption": index.captions[i],
                   "image_id": index.image_ids[i // 5]}
            if "image_row" in query:
                row["ground_truth"] = i // 5 == query["image_row"]
            out.append(row)
    return out


def run_search(req):
    """Every query's ranked results: [{query, direction, how, seconds, results: [...]}]."""
    from itr.index import Index

    if req.k < 1 or req.rerank < 1:
        raise ConfigError("--k and --rerank must be at least 1")
    index = Index(req.index)
    model, tok, recipe, short = index.load_models(req.checkpoint, req.device)
    t0 = time.perf_counter()
    side, full, glob, queries = _queries(req, index, model, tok, recipe, short)
    scores, ids, how = ranked(index, model, side, full, glob, req.k, req.rerank, req.exact)
    dt = time.perf_counter() - t0
    direction = "text->image" if side == "images" else "image->text"
    return [{"query": q, "direction": direction, "how": how, "seconds": dt / len(queries),
             "results": _rows(index, side, scores[j], ids[j], q)} for j, q in enumerate(queries)]


def format_results(found, width=70):
    """A ranked table per query, for terminals."""
    lines = []
    for q in found:
        what = q["query"].get("text") or q["query"].get("image_id") or q["query"].get("image_file")
        lines.append(f"query {what!r} ({q['direction']}, {q['how']}; {1000 * q['seconds']:.0f} ms)")
        lines.append(f"{'rank':>4}  {'score':>8}  {'image id':<28} caption")
        for r in q["results"]:
            mark = " *" if r.get("ground_truth") else ""
            cap = r["caption"] if len(r["caption"]) <= width else r["caption"][:width - 3] + "..."
            lines.append(f"{r['rank']:>4}  {r['score']:8.4f}  {r['image_id']:<28} {cap}{mark}")
        if any("ground_truth" in r for r in q["results"]):
            lines.append("  * a caption of the query image")
    return "\n".join(lines)


def print_results(found, as_json=False):
    print(json.dumps(found, indent=1) if as_json else format_results(found))
