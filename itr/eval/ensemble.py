"""``itr eval CKPT_A CKPT_B ... --ensemble [--weights w1,w2,...]``: the weighted average of the members' similarity
matrices (the ensemble rows of SCAN, VSRN and VSE-infinity average two models' similarities), each member and
the ensemble reported side by side.

Every member embeds the split with its own tokenizer; the ensemble's score of a tile is the weighted sum of the
members' scores of that tile, so the ensemble goes through the one tiled, rank-distributed path
(``itr.eval.job.score_embeddings``) as a single model does and never holds a whole matrix. The members'
embeddings ride in one flat dict (``"{member}:{key}"``), which the tile machinery cuts into rows like a token-level
model's.
"""
import json
from pathlib import Path

from itr.errors import ConfigError, DataError
from itr.eval.metrics import KEYS

UNSUPPORTED = ("two_stage", "shortlist", "save_topk", "state", "log_to_run", "log_run", "experiment")


def parse_weights(text, n):
    """``w1,w2,...`` (one non-negative number per member, not all zero) normalised to sum to 1; None: equal."""
    if text is None:
        return [1.0 / n] * n
    try:
        w = [float(x) for x in str(text).split(",")]
    except ValueError:
        raise ConfigError(f"--weights {text!r}: expected {n} comma-separated numbers") from None
    if len(w) != n or any(x < 0 for x in w) or sum(w) <= 0:
        raise ConfigError(f"--weights {text!r}: expected {n} non-negative numbers (one per checkpoint), not all 0")
    return [x / sum(w) for x in w]


def flat(embs):
    """Members' embeddings (tensors, or dicts of tensors for token-level models) as one flat dict."""
    out = {}
    for i, e in enumerate(embs):
        for k, v in (e.items() if isinstance(e, dict) else [("", e)]):
            out[f"{i}:{k}"] = v
    return out


def member(d, i):
    """Member ``i``'s rows of a flat dict, in the form its ``score`` takes."""
    sub = {k.split(":", 1)[1]: v for k, v in d.items() if k.split(":", 1)[0] == str(i)}
    return sub[""] if set(sub) == {""} else sub


def ensemble_score(models, weights):
    """The score function of the ensemble: sum_i w_i * score_i, on a tile of the flat embeddings."""
    def score(img, cap):
        total = None
        for i, (m, w) in enumerate(zip(models, weights)):
            s = w * m.score(member(img, i), member(cap, i)).float()
            total = s if total is None else total + s
        return total
    return score


def run_ensemble(req):
    """Each member, then the ensemble, on ``req.split`` (every rank takes a share); rank 0 reports. Returns
    {"members": [{"checkpoint", "weight", "metrics"}], "ensemble": metrics} on rank 0, None elsewhere."""
    from itr.checkpoint import load_for_eval
    from itr.data.sources import load_split
    from itr.distributed import finish_job, init_job
    from itr.eval.embed import embed_split
    from itr.eval.job import score_embeddings

    bad = [k for k in UNSUPPORTED if getattr(req, k)]
    if bad:
        raise ConfigError(f"--ensemble does not combine with {', '.join('--' + k.replace('_', '-') for k in bad)}")
    if len(req.ensemble) < 2:
        raise ConfigError("--ensemble needs at least two checkpoints")
    weights = parse_weights(req.weights, len(req.ensemble))
    rank, world, job_device = init_job()
    device = req.device or job_device
    loaded = [load_for_eval(c, device) for c in req.ensemble]
    recipe = loaded[0][2]
    protocol = req.protocol or recipe.eval.protocol
    chunk, batch = req.chunk_size or recipe.eval.chunk_size, req.batch_size or recipe.eval.batch_size
    split = load_split(req.data, req.split, recipe.data.image_size, verify=recipe.data.verify)
    imgs, caps, members = [], [], []
    for ckpt, (model, tok, _, meta) in zip(req.ensemble, loaded):
        if split.image_key == "feats" and split.images.shape[-1] != meta["img_dim"]:
            raise DataError(f"{req.data} split {req.split!r} has {split.images.shape[-1]}-d features; {ckpt} was "
                            f"trained on {meta['img_dim']}-d")
        img, cap = embed_split(model, split, tok, batch, device, rank, world, rank == 0)
        metrics, _ = score_embeddings(model.score, img, cap, protocol, chunk, device, rank, world, rank == 0)
        imgs.append(img)
        caps.append(cap)
        members.append(metrics)
    models = [m for m, *_ in loaded]
    metrics, _ = score_embeddings(ensemble_score(models, weights), flat(imgs), flat(caps), protocol, chunk, device,
                                  rank, world, rank == 0, save_sims=req.save_sims)
    if world > 1:
        finish_job()
    if rank != 0:
        return None
    out = {"members": [{"checkpoint": str(c), "weight": w, "metrics": m}
                       for c, w, m in zip(req.ensemble, weights, members)], "ensemble": metrics}
    print(side_by_side(out, f"ensemble of {len(models)} on {req.data} [{req.split}], protocol {protocol}"
                            + (f", {world} ranks" if world > 1 else "")))
    if req.json_out:
        Path(req.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(req.json_out).write_text(json.dumps(out, indent=1))
        print(f"wrote {req.json_out}")
    return out


def side_by_side(out, title):
    """One row per member and one for the ensemble, the metrics as columns."""
    head = f"{'':<28}" + "".join(f"{k:>10}" for k in KEYS)
    lines = [title, head]
    for i, m in enumerate(out["members"]):
        name = f"[{i}] w={m['weight']:.2f} {'/'.join(Path(m['checkpoint']).parts[-2:])}"
        lines.append(f"{name[:28]:<28}" + "".join(f"{m['metrics'][k]:>10.1f}" for k in KEYS))
    lines.append(f"{'ensemble':<28}" + "".join(f"{out['ensemble'][k]:>10.1f}" for k in KEYS))
    return "\n".join(lines)
