"""``itr eval`` and ``itr score``: embed -> tiled scores -> ranks -> metrics, and the report."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from itr.eval.embed import embed_split
from itr.eval.metrics import KEYS, evaluate_sims, format_table
from itr.eval.scores import similarity_matrix


def evaluate_model(model, split, tokenizer, eval_cfg, device="cpu", rank=0, world=1, progress=False, protocol=None):
    """Metrics of ``model`` on ``split``: every rank embeds a slice of the images and captions and scores
    a block of image rows in tiles; rank 0 gets the matrix and computes the metrics. Returns (metrics, sims)
    on rank 0, (None, None) elsewhere."""
    img, cap = embed_split(model, split, tokenizer, eval_cfg.batch_size, device, rank, world, progress)
    sims = similarity_matrix(model.score, img, cap, eval_cfg.chunk_size, device, progress, rank, world)
    if rank != 0:
        return None, None
    return evaluate_sims(sims, protocol or eval_cfg.protocol, chunk=eval_cfg.chunk_size), sims


def write_json(metrics, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=1))


@dataclass
class EvalRequest:
    """One evaluation job: what to evaluate, how, and where the metrics go (``itr eval`` builds it from its
    options). None takes the checkpoint recipe's value (protocol, chunk_size, batch_size) or the job's (device)."""
    checkpoint: str | Path
    data: str | Path
    split: str
    protocol: str | None = None  # 1k, 5k or coco-5fold
    json_out: str | Path | None = None  # write the metrics here
    save_sims: str | Path | None = None  # save the (n_images, n_captions) similarity matrix here (.npy)
    chunk_size: int | None = None
    batch_size: int | None = None
    device: str | None = None
    two_stage: int | None = None  # K: a global shortlist of K per query, then the full score on it only
    compare_full: bool = False  # with two_stage: also score every pair, report the recall lost and the speedup
    log_to_run: str | None = None  # MLflow: add the metrics to this (training) run
    log_run: bool = False  # MLflow: log into a new evaluation run...
    experiment: str | None = None  # ...of this experiment (implies log_run)
    tracking_uri: str | None = None
    run_name: str | None = None  # of the new evaluation run

    @property
    def logs_to_mlflow(self):
        return bool(self.log_to_run or self.log_run or self.experiment)


class _Loaded(NamedTuple):
    """What the job loaded once: the checkpoint's model, tokenizer and recipe, the split; and its rank."""
    model: object
    tokenizer: object
    recipe: object
    split: object
    rank: int
    world: int


def run_eval(request, data=None, split=None, **options):
    """The evaluation job of an EvalRequest, or of ``run_eval(checkpoint, data, split, **fields)``. Under
    `accelerate launch` / torchrun / srun every rank takes a share of the embedding and of the score tiles,
    and rank 0 reports. ``two_stage=K``: global shortlist of K, then the model's full score on the shortlist
    only (``itr.eval.two_stage``); ``compare_full`` also scores every pair and reports the recall lost and
    the speedup.

    MLflow (rank 0): ``log_to_run=RUN_ID`` adds the metrics to that (training) run, ``log_run`` / ``experiment``
    to a new evaluation run; keys are ``{split}_{protocol}_{metric}`` (e.g. ``test_1k_rsum``), the same the
    training logs for its test split, so runs evaluated later line up in ``itr compare``."""
    from itr.checkpoint import load_for_eval
    from itr.data.sources import load_split
    from itr.distributed import finish_job, init_job

    if isinstance(request, EvalRequest):
        if data is not None or split is not None or options:
            raise TypeError("run_eval(EvalRequest) takes no other arguments")
        req = request
    else:
        req = EvalRequest(request, data, split, **options)
    rank, world, job_device = init_job()
    model, tokenizer, recipe, meta = load_for_eval(req.checkpoint, req.device or job_device)
    if req.chunk_size:
        recipe.eval.chunk_size = req.chunk_size
    if req.batch_size:
        recipe.eval.batch_size = req.batch_size
    req = replace(req, device=req.device or job_device, protocol=req.protocol or recipe.eval.protocol)
    data_split = load_split(req.data, req.split, recipe.data.image_size, verify=recipe.data.verify)
    if data_split.image_key == "feats" and data_split.images.shape[-1] != meta["img_dim"]:
        from itr.errors import DataError

        raise DataError(f"{req.data} split {req.split!r} has {data_split.images.shape[-1]}-d features; "
                        f"the checkpoint was trained on {meta['img_dim']}-d")
    job = _Loaded(model, tokenizer, recipe, data_split, rank, world)
    metrics = _two_stage(req, job) if req.two_stage else _all_pairs(req, job)
    if rank == 0 and req.logs_to_mlflow:
        _log_mlflow(req, metrics, recipe, meta)
    if world > 1:
        finish_job()
    return metrics


def _title(req, job):
    return f"{job.recipe.model.name} on {req.data} [{req.split}]"


def _ranks(job):
    return f", {job.world} ranks" if job.world > 1 else ""


def _all_pairs(req, job):
    """Every pair scored; the metrics on rank 0 (None elsewhere), reported and saved as asked."""
    metrics, sims = evaluate_model(job.model, job.split, job.tokenizer, job.recipe.eval, req.device, job.rank,
                                   job.world, progress=job.rank == 0, protocol=req.protocol)
    if job.rank == 0:
        if req.save_sims:
            np.save(req.save_sims, sims)
        report(metrics, f"{_title(req, job)}, protocol {req.protocol}{_ranks(job)}", req.json_out)
    return metrics


def _log_mlflow(req, metrics, recipe, meta):
    """The metrics (and a metrics JSON + recall@K plot as artifacts) into MLflow; a failure only warns."""
    import tempfile

    from itr.config import to_dict
    from itr.plots import recall_at_k
    from itr.tracking import log_evaluation, metric_prefix

    prefix = metric_prefix(req.split, req.protocol, f"_top{req.two_stage}" if req.two_stage else "")
    rd = to_dict(recipe)
    with tempfile.TemporaryDirectory() as tmp:
        arts = [Path(tmp) / f"{prefix}metrics.json", Path(tmp) / f"{prefix}recall_at_k.png"]
        write_json({**{k: metrics[k] for k in KEYS}, "checkpoint": str(req.checkpoint), "data": str(req.data),
                    "split": req.split, "protocol": req.protocol}, arts[0])
        recall_at_k({f"{req.split} ({req.protocol})": metrics}, arts[1], f"{rd['model']['name']}: {req.checkpoint}")
        return log_evaluation(metrics, prefix, uri=req.tracking_uri, run_id=req.log_to_run, experiment=req.experiment,
                              recipe=rd, meta=meta, checkpoint=Path(req.checkpoint).resolve(),
                              data=Path(req.data).resolve(), run_name=req.run_name, artifacts=arts)


def _two_stage(req, job):
    """Global shortlist of ``req.two_stage`` per query, then the full score on it (and, with compare_full,
    every pair too, for the recall lost and the speedup); the metrics on rank 0, None elsewhere."""
    import time

    from itr.eval.two_stage import two_stage_metrics

    k, protocol, cfg, rank = req.two_stage, req.protocol, job.recipe.eval, job.rank
    img, cap = embed_split(job.model, job.split, job.tokenizer, cfg.batch_size, req.device, rank, job.world, rank == 0)
    metrics = two_stage_metrics(job.model, img, cap, k, protocol, cfg.chunk_size, req.device, rank, job.world,
                                rank == 0)
    full = None
    if req.compare_full:
        t0 = time.perf_counter()
        sims = similarity_matrix(job.model.score, img, cap, cfg.chunk_size, req.device, rank == 0, rank, job.world)
        full_s = time.perf_counter() - t0
        if rank == 0:
            full = evaluate_sims(sims, protocol, chunk=cfg.chunk_size)
            full["timing"] = {"full_s": full_s}
    if rank != 0:
        return None
    title = _title(req, job)
    report(metrics, f"{title}, protocol {protocol}, two-stage: global top-{k} then full score{_ranks(job)}", None)
    t = metrics["timing"]
    print(f"  global scores {t['global_s']:.1f} s, rerank {t['rerank_s']:.1f} s")
    if full is not None:
        report(full, f"{title}, protocol {protocol}, every pair scored", None)
        two_s = t["global_s"] + t["rerank_s"]
        print(f"  two-stage vs every pair: rsum {metrics['rsum']:.1f} vs {full['rsum']:.1f} "
              f"(lost {full['rsum'] - metrics['rsum']:.1f}); time {two_s:.1f} s vs {full['timing']['full_s']:.1f} s "
              f"({full['timing']['full_s'] / max(two_s, 1e-9):.2f}x faster)")
    if req.json_out:
        _write_two_stage_json(metrics, full, k, req.json_out)
    return metrics


def _write_two_stage_json(metrics, full, k, path):
    out = {key: metrics[key] for key in KEYS}
    out["two_stage"] = {"k": k, "timing": metrics["timing"]}
    if full is not None:
        out["two_stage"]["full"] = {key: full[key] for key in KEYS}
        out["two_stage"]["full_timing"] = full["timing"]
        out["two_stage"]["rsum_lost"] = full["rsum"] - metrics["rsum"]
    write_json(out, path)
    print(f"wrote {path}")


def run_score(sims_path, protocol="1k", json_out=None, chunk_size=1024):
    from itr.errors import DataError

    p = Path(sims_path)
    if not p.is_file():
        raise DataError(f"{sims_path} does not exist")
    try:
        sims = np.load(p, mmap_mode="r")
    except Exception as e:
        raise DataError(f"{sims_path}: cannot read as .npy ({e})") from None
    if sims.ndim != 2 or 0 in sims.shape:
        raise DataError(f"{sims_path}: expected a non-empty (n_images, n_captions) matrix, got shape {sims.shape}")
    from itr.data.sources import check_finite

    check_finite(sims, sims_path)
    try:
        metrics = evaluate_sims(sims, protocol, chunk=chunk_size)
    except ValueError as e:
        raise DataError(f"{sims_path}: {e}") from None
    report(metrics, f"{sims_path}, protocol {protocol}", json_out)
    return metrics


def report(metrics, title, json_out=None):
    print(format_table(metrics, title))
    if "folds" in metrics:
        for i, f in enumerate(metrics["folds"]):
            print(f"  fold {i}: rsum {f['rsum']:.1f}  i2t R@1 {f['i2t_R1']:.1f}  t2i R@1 {f['t2i_R1']:.1f}")
    if json_out:
        write_json({k: metrics[k] for k in KEYS + (["folds"] if "folds" in metrics else [])}, json_out)
        print(f"wrote {json_out}")
