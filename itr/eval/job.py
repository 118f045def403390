"""``itr eval`` and ``itr score``: embed -> tiled scores -> ranks -> metrics, and the report."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from itr.eval.embed import embed_split
from itr.eval.metrics import KEYS, evaluate_sims, format_table


def evaluate_model(model, split, tokenizer, eval_cfg, device="cpu", rank=0, world=1, progress=False, protocol=None,
                   topk=0, save_sims=None, state=None, state_every=300.0):
    """Metrics of ``model`` on ``split``: every rank embeds a slice of the images and captions, then scores its
    share of the tiles, folding each into rank counters (``itr.eval.stream``: no full matrix anywhere). Returns
    (metrics, per-block top-K lists or None) on rank 0, (None, None) elsewhere."""
    img, cap = embed_split(model, split, tokenizer, eval_cfg.batch_size, device, rank, world, progress,
                           spill_of(eval_cfg))
    return score_embeddings(model.score, img, cap, protocol or eval_cfg.protocol, eval_cfg.chunk_size, device, rank,
                            world, progress, topk, save_sims, state, state_every)


def spill_of(eval_cfg):
    """Where plain embeddings over ``eval.spill_gib`` go (``itr.eval.spill``)."""
    from itr.eval.embed import Spill

    return Spill(eval_cfg.spill_gib, eval_cfg.spill_dir)


def final_test(recipe, out, device, rank, world, name="best"):
    """Evaluate DIR/best (or DIR/``name``) on the test split (every rank embeds a slice), if the data has one."""
    from itr import checkpoint as ckpt
    from itr.data.sources import data_kind, data_root, load_split
    from itr.errors import DataError

    root = data_root(recipe)
    try:
        data_kind(root, recipe.data.test_split)
    except DataError:
        if rank == 0:
            print(f"[itr] no {recipe.data.test_split!r} split in {root}: skipping the test evaluation", flush=True)
        return None
    model, tokenizer, _, _ = ckpt.load_for_eval(out / name, device)
    split = load_split(root, recipe.data.test_split, recipe.data.image_size, verify=recipe.data.verify)
    metrics, _ = evaluate_model(model, split, tokenizer, recipe.eval, device, rank, world)
    return metrics


def score_embeddings(score_fn, img, cap, protocol, chunk, device="cpu", rank=0, world=1, progress=False, topk=0,
                     save_sims=None, state=None, state_every=300.0):
    """The streamed scoring of embedded images and captions (see ``evaluate_model``). With a state folder, SIGTERM
    or SIGUSR1 saves it and raises ``itr.eval.stream.EvalStopped`` (a rerun resumes)."""
    from itr.eval.metrics import fold_mean, recall_metrics
    from itr.eval.stream import Streamer, stream_ranks
    from itr.step import Stop

    _check_finite(img, "image")
    _check_finite(cap, "caption")
    streamer = Streamer(score_fn, img, cap, chunk, device, rank, world, progress=progress)
    sims = _sims_file(save_sims, streamer.n, streamer.m, rank, world) if save_sims else None
    stop = Stop() if state else None
    try:
        out = stream_ranks(streamer, protocol, topk, sims, state, state_every, stop)
    finally:
        if stop is not None:
            stop.close()
    if sims is not None:
        sims.flush()
        _barrier(world)
    if rank != 0:
        return None, None
    ranks, tops = out
    if topk:  # the ground truths' ranks ride along with the lists (the report marks them)
        for top, r in zip(tops, ranks):
            top.gt_ranks = r
    folds = [recall_metrics(*r) for r in ranks]
    return (folds[0] if len(folds) == 1 else fold_mean(folds)), (tops if topk else None)


def _check_finite(emb, what, rows=4096):
    """In blocks of rows: ``isfinite`` makes float temporaries the size of its input (0.4 GiB of the whole
    job's peak at 50K x 250K otherwise)."""
    import torch

    from itr.eval.spill import DiskRows

    if isinstance(emb, DiskRows):  # checked as its rows were written
        return
    for t in (emb.values() if isinstance(emb, dict) else [emb]):
        if t.is_floating_point() and not all(bool(torch.isfinite(b).all()) for b in t.split(rows)):
            raise ValueError(f"NaN or inf in the {what} embeddings: the model diverged or the input is bad")


def _barrier(world):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _sims_file(path, n, m, rank, world):
    """The (n, m) float32 .npy every rank writes its tiles into (memory-mapped: never held in RAM)."""
    if rank == 0:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, m)).flush()
    _barrier(world)
    return np.lib.format.open_memmap(path, mode="r+")


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
    spill_gib: float | None = None  # plain embeddings over this go to a file (``itr.eval.spill``)
    device: str | None = None
    two_stage: int | None = None  # K: the checkpoint's global score shortlists K per query, its full score reranks
    shortlist: str | Path | None = None  # a cascade: shortlists from this checkpoint's global score or top-K file...
    k: int | None = None  # ...of K per query, reranked by the checkpoint's score
    compare_full: bool = False  # with a cascade: also score every pair, report the recall lost and the speedup
    save_topk: int | None = None  # save every query's K best candidates...
    topk_path: str | Path | None = None  # ...here (.npz, default topk-SPLIT.npz)
    state: str | Path | None = None  # resumable: finished tiles and counters are kept in this folder
    state_every: float = 300.0  # seconds between state writes
    log_to_run: str | None = None  # MLflow: add the metrics to this (training) run
    log_run: bool = False  # MLflow: log into a new evaluation run...
    experiment: str | None = None  # ...of this experiment (implies log_run)
    tracking_uri: str | None = None
    run_name: str | None = None  # of the new evaluation run
    report: str | Path | None = None  # write the report page (itr.report) into this folder
    report_queries: int = 10  # queries sampled each way for the report, failures first
    report_images: str | Path | None = None  # a folder of the split's images, named by their ids (thumbnails)
    ensemble: list | None = None  # checkpoints whose similarities are averaged (``itr.eval.ensemble``)...
    weights: str | None = None  # ...with these weights, "w1,w2,..." (default: equal)

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
    only (``itr.eval.cascade``); ``compare_full`` also scores every pair and reports the recall lost and
    the speedup.

    MLflow (rank 0): ``log_to_run=RUN_ID`` adds the metrics to that (training) run, ``log_run`` / ``experiment``
    to a new evaluation run (nested under the checkpoint's training run); keys are ``test/{metric}`` for the
    recipe's test split and protocol (what the training logs), else ``{split}_{protocol}/{metric}`` (e.g.
    ``test_5k/rsum``), so runs evaluated later line up in ``itr compare`` (``itr.tracking.names``)."""
    from itr.checkpoint import load_for_eval
    from itr.data.sources import load_split
    from itr.distributed import finish_job, init_job

    if isinstance(request, EvalRequest):
        if data is not None or split is not None or options:
            raise TypeError("run_eval(EvalRequest) takes no other arguments")
        req = request
    else:
        req = EvalRequest(request, data, split, **options)
    if req.ensemble:
        raise TypeError("an ensemble request goes to itr.eval.ensemble.run_ensemble")
    rank, world, job_device = init_job()
    model, tokenizer, recipe, meta = load_for_eval(req.checkpoint, req.device or job_device)
    if req.chunk_size:
        recipe.eval.chunk_size = req.chunk_size
    if req.batch_size:
        recipe.eval.batch_size = req.batch_size
    if req.spill_gib is not None:
        recipe.eval.spill_gib = req.spill_gib
    req = replace(req, device=req.device or job_device, protocol=req.protocol or recipe.eval.protocol)
    data_split = load_split(req.data, req.split, recipe.data.image_size, verify=recipe.data.verify)
    if data_split.image_key == "feats" and data_split.images.shape[-1] != meta["img_dim"]:
        from itr.errors import DataError

        raise DataError(f"{req.data} split {req.split!r} has {data_split.images.shape[-1]}-d features; "
                        f"the checkpoint was trained on {meta['img_dim']}-d")
    job = _Loaded(model, tokenizer, recipe, data_split, rank, world)
    if req.report and (req.two_stage or req.shortlist):
        from itr.errors import ConfigError

        raise ConfigError("--report shows an evaluation of every pair; leave out --two-stage / --shortlist")
    metrics = _cascade(req, job) if (req.two_stage or req.shortlist) else _all_pairs(req, job)
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
    """Every pair scored, streamed; the metrics on rank 0 (None elsewhere), reported and saved as asked."""
    cfg, main = job.recipe.eval, job.rank == 0
    spill = None if req.report else spill_of(cfg)  # the report reads embeddings whole
    img, cap = embed_split(job.model, job.split, job.tokenizer, cfg.batch_size, req.device, job.rank, job.world, main,
                           spill)
    topk = max(req.save_topk or 0, 5 if req.report else 0)
    metrics, tops = score_embeddings(job.model.score, img, cap, req.protocol, cfg.chunk_size, req.device, job.rank,
                                     job.world, main, topk, req.save_sims, req.state, req.state_every)
    if main:
        report(metrics, f"{_title(req, job)}, protocol {req.protocol}{_ranks(job)}", req.json_out)
        if req.save_topk:
            from itr.eval.stream import protocol_blocks
            from itr.eval.topk import save_topk

            path = req.topk_path or f"topk-{req.split}.npz"
            save_topk(path, [t.cut(req.save_topk) for t in tops], protocol_blocks(job.split.num_images, req.protocol))
            print(f"wrote the top-{req.save_topk} lists to {path}")
        if req.report:
            from itr.report import ReportInputs, write_report

            page = write_report(ReportInputs(job.model, job.tokenizer, job.split, img, cap, metrics, tops, req.protocol,
                                             {"checkpoint": str(req.checkpoint), "data": str(req.data),
                                              "split": req.split, "model": job.recipe.model.name}),
                                req.report, req.report_queries, req.report_images)
            print(f"wrote the report page {page}")
    return metrics


def _log_mlflow(req, metrics, recipe, meta):
    """The metrics (and a metrics JSON + recall@K plot as artifacts) into MLflow; a failure only warns."""
    import tempfile

    from itr.config import to_dict
    from itr.plots import recall_at_k
    from itr.tracking import eval_family, log_evaluation, metric_prefix

    k = req.two_stage or (req.k if req.shortlist else None)
    prefix = metric_prefix(req.split, req.protocol, f"_top{k}" if k else "")
    family = eval_family(req.split, req.protocol, f"_top{k}" if k else "", (recipe.data.test_split, recipe.eval.protocol))
    rd = to_dict(recipe)
    with tempfile.TemporaryDirectory() as tmp:
        arts = [Path(tmp) / f"{prefix}metrics.json", Path(tmp) / f"{prefix}recall_at_k.png"]
        write_json({**{k: metrics[k] for k in KEYS}, "checkpoint": str(req.checkpoint), "data": str(req.data),
                    "split": req.split, "protocol": req.protocol}, arts[0])
        recall_at_k({f"{req.split} ({req.protocol})": metrics}, arts[1], f"{rd['model']['name']}: {req.checkpoint}")
        if req.report:  # the page and its images, as eval/{prefix}report/ of the run
            import shutil

            shutil.copytree(req.report, Path(tmp) / "page" / f"{prefix}report")
            arts.append(Path(tmp) / "page")
        return log_evaluation(metrics, family, uri=req.tracking_uri, run_id=req.log_to_run, experiment=req.experiment,
                              recipe=rd, meta=meta, checkpoint=Path(req.checkpoint).resolve(),
                              data=Path(req.data).resolve(), run_name=req.run_name, artifacts=arts)


def _cascade(req, job):
    """A shortlist per query (the checkpoint's own global score with --two-stage K; another checkpoint's global
    score or a top-K file with --shortlist), reranked by the checkpoint's score; with compare_full, every pair
    too, for the recall lost and the speedup. The metrics on rank 0, None elsewhere."""
    import time

    from itr.eval.cascade import cascade_metrics

    k, cfg, rank = req.two_stage or req.k, job.recipe.eval, job.rank
    if not k:
        from itr.errors import ConfigError

        raise ConfigError("--shortlist needs --k K, the shortlist length")
    img, cap = embed_split(job.model, job.split, job.tokenizer, cfg.batch_size, req.device, rank, job.world, rank == 0)
    t0 = time.perf_counter()
    lists = _shortlists(req, job, img, cap, k)
    t1 = time.perf_counter()
    metrics = cascade_metrics(job.model, img, cap, lists, req.protocol, req.device, rank, job.world, rank == 0)
    t2 = time.perf_counter()
    full = None
    if req.compare_full:
        full, _ = score_embeddings(job.model.score, img, cap, req.protocol, cfg.chunk_size, req.device, rank, job.world,
                                   rank == 0)
        if rank == 0:
            full["timing"] = {"full_s": time.perf_counter() - t2}
    if rank != 0:
        return None
    metrics["timing"] = {"global_s": t1 - t0, "rerank_s": t2 - t1}
    _report_cascade(req, job, metrics, full, k)
    return metrics


def _shortlists(req, job, img, cap, k):
    """Per protocol block, the (i2t, t2i) candidate lists of the cascade's first stage."""
    from itr.eval.cascade import file_shortlists, streamed_shortlists

    cfg, rank, world = job.recipe.eval, job.rank, job.world
    if req.shortlist and str(req.shortlist).endswith(".npz"):
        return file_shortlists(req.shortlist, job.split.num_images, k, req.protocol)
    if req.shortlist:
        from itr.checkpoint import load_for_eval

        model, tok, _, _ = load_for_eval(req.shortlist, req.device)
        img, cap = embed_split(model, job.split, tok, cfg.batch_size, req.device, rank, world, rank == 0)
    else:
        model = job.model
    score = getattr(model, "global_score", None) or model.score
    if req.two_stage and not hasattr(model, "global_score"):
        from itr.errors import ConfigError

        raise ConfigError(f"--two-stage needs a model with a global score (global_score); {type(model).__name__} has "
                          f"none: give the shortlist's checkpoint with --shortlist CKPT --k K")
    return streamed_shortlists(score, img, cap, k, req.protocol, cfg.chunk_size, req.device, rank, world, rank == 0)


def _report_cascade(req, job, metrics, full, k):
    source = "global" if not req.shortlist else Path(str(req.shortlist)).name
    title = _title(req, job)
    report(metrics, f"{title}, protocol {req.protocol}, cascade: {source} top-{k} then full score{_ranks(job)}", None)
    t = metrics["timing"]
    print(f"  shortlist {t['global_s']:.1f} s, rerank {t['rerank_s']:.1f} s")
    if full is not None:
        report(full, f"{title}, protocol {req.protocol}, every pair scored", None)
        two_s = t["global_s"] + t["rerank_s"]
        print(f"  cascade vs every pair: rsum {metrics['rsum']:.1f} vs {full['rsum']:.1f} "
              f"(lost {full['rsum'] - metrics['rsum']:.1f}); time {two_s:.1f} s vs {full['timing']['full_s']:.1f} s "
              f"({full['timing']['full_s'] / max(two_s, 1e-9):.2f}x faster)")
    if req.json_out:
        _write_two_stage_json(metrics, full, k, req.json_out)


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
    if sims.shape[0] == 5 * sims.shape[1]:
        raise DataError(f"{sims_path}: shape {sims.shape} is (captions, images), the transpose of what `itr score` "
                        f"reads ((n_images, 5 n_images), caption j of image j // 5); save the transpose: "
                        f"np.save(PATH, np.load({str(sims_path)!r}).T)")
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
