"""``itr eval`` and ``itr score``: embed -> tiled scores -> ranks -> metrics, and the report."""
import json
from pathlib import Path

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


def run_eval(checkpoint, data, split, protocol=None, json_out=None, save_sims=None, chunk_size=None, batch_size=None,
             device=None, two_stage=None, compare_full=False, log_to_run=None, log_run=False, experiment=None,
             tracking_uri=None, run_name=None):
    """The evaluation job; under `accelerate launch` / torchrun / srun every rank takes a share of the
    embedding and of the score tiles, and rank 0 reports. ``two_stage=K``: global shortlist of K, then the
    model's full score on the shortlist only (``itr.eval.two_stage``); ``compare_full`` also scores every
    pair and reports the recall lost and the speedup.

    MLflow (rank 0): ``log_to_run=RUN_ID`` adds the metrics to that (training) run, ``log_run`` / ``experiment``
    to a new evaluation run; keys are ``{split}_{protocol}_{metric}`` (e.g. ``test_1k_rsum``), the same the
    training logs for its test split, so runs evaluated later line up in ``itr compare``."""
    from itr.checkpoint import load_for_eval
    from itr.data.sources import load_split
    from itr.distributed import finish_job, init_job

    rank, world, job_device = init_job()
    device = device or job_device
    model, tokenizer, recipe, meta = load_for_eval(checkpoint, device)
    if chunk_size:
        recipe.eval.chunk_size = chunk_size
    if batch_size:
        recipe.eval.batch_size = batch_size
    data_split = load_split(data, split, recipe.data.image_size, verify=recipe.data.verify)
    if data_split.image_key == "feats" and data_split.images.shape[-1] != meta["img_dim"]:
        from itr.errors import DataError

        raise DataError(f"{data} split {split!r} has {data_split.images.shape[-1]}-d features; "
                         f"the checkpoint was trained on {meta['img_dim']}-d")
    if two_stage:
        metrics = _two_stage(model, data_split, tokenizer, recipe, device, rank, world, protocol, two_stage,
                             compare_full, f"{recipe.model.name} on {data} [{split}]", json_out)
        if rank == 0 and (log_to_run or log_run or experiment):
            _log_mlflow(metrics, split, protocol or recipe.eval.protocol, f"_top{two_stage}", checkpoint, data, recipe,
                        meta, json_out, log_to_run, experiment, tracking_uri, run_name)
        if world > 1:
            finish_job()
        return metrics
    metrics, sims = evaluate_model(model, data_split, tokenizer, recipe.eval, device, rank, world,
                                   progress=rank == 0, protocol=protocol)
    if rank == 0:
        if save_sims:
            np.save(save_sims, sims)
        report(metrics, f"{recipe.model.name} on {data} [{split}], protocol {protocol or recipe.eval.protocol}"
                        + (f", {world} ranks" if world > 1 else ""), json_out)
        if log_to_run or log_run or experiment:
            _log_mlflow(metrics, split, protocol or recipe.eval.protocol, "", checkpoint, data, recipe, meta, json_out,
                        log_to_run, experiment, tracking_uri, run_name)
    if world > 1:
        finish_job()
    return metrics


def _log_mlflow(metrics, split, protocol, extra, checkpoint, data, recipe, meta, json_out, run_id, experiment, uri,
                run_name):
    """The metrics (and a metrics JSON + recall@K plot as artifacts) into MLflow; a failure only warns."""
    import tempfile

    from itr.config import to_dict
    from itr.plots import recall_at_k
    from itr.tracking import log_evaluation, metric_prefix

    prefix = metric_prefix(split, protocol, extra)
    rd = to_dict(recipe)
    with tempfile.TemporaryDirectory() as tmp:
        arts = [Path(tmp) / f"{prefix}metrics.json", Path(tmp) / f"{prefix}recall_at_k.png"]
        write_json({**{k: metrics[k] for k in KEYS}, "checkpoint": str(checkpoint), "data": str(data), "split": split,
                    "protocol": protocol}, arts[0])
        recall_at_k({f"{split} ({protocol})": metrics}, arts[1], f"{rd['model']['name']}: {checkpoint}")
        return log_evaluation(metrics, prefix, uri=uri, run_id=run_id, experiment=experiment, recipe=rd, meta=meta,
                              checkpoint=Path(checkpoint).resolve(), data=Path(data).resolve(), run_name=run_name,
                              artifacts=arts)


def _two_stage(model, split, tokenizer, recipe, device, rank, world, protocol, k, compare_full, title, json_out):
    import time

    from itr.eval.embed import embed_split
    from itr.eval.two_stage import two_stage_metrics

    protocol = protocol or recipe.eval.protocol
    cfg = recipe.eval
    img, cap = embed_split(model, split, tokenizer, cfg.batch_size, device, rank, world, rank == 0)
    metrics = two_stage_metrics(model, img, cap, k, protocol, cfg.chunk_size, device, rank, world, rank == 0)
    full = None
    if compare_full:
        t0 = time.perf_counter()
        sims = similarity_matrix(model.score, img, cap, cfg.chunk_size, device, rank == 0, rank, world)
        full_s = time.perf_counter() - t0
        if rank == 0:
            full = evaluate_sims(sims, protocol, chunk=cfg.chunk_size)
            full["timing"] = {"full_s": full_s}
    if rank != 0:
        return None
    report(metrics, f"{title}, protocol {protocol}, two-stage: global top-{k} then full score"
                    + (f", {world} ranks" if world > 1 else ""), None)
    t = metrics["timing"]
    print(f"  global scores {t['global_s']:.1f} s, rerank {t['rerank_s']:.1f} s")
    if full is not None:
        report(full, f"{title}, protocol {protocol}, every pair scored", None)
        two_s = t["global_s"] + t["rerank_s"]
        print(f"  two-stage vs every pair: rsum {metrics['rsum']:.1f} vs {full['rsum']:.1f} "
              f"(lost {full['rsum'] - metrics['rsum']:.1f}); time {two_s:.1f} s vs {full['timing']['full_s']:.1f} s "
              f"({full['timing']['full_s'] / max(two_s, 1e-9):.2f}x faster)")
    if json_out:
        out = {key: metrics[key] for key in KEYS}
        out["two_stage"] = {"k": k, "timing": metrics["timing"]}
        if full is not None:
            out["two_stage"]["full"] = {key: full[key] for key in KEYS}
            out["two_stage"]["full_timing"] = full["timing"]
            out["two_stage"]["rsum_lost"] = full["rsum"] - metrics["rsum"]
        write_json(out, json_out)
        print(f"wrote {json_out}")
    return metrics


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
