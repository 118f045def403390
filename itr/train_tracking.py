"""What a training sends to MLflow, beside the loop of ``itr/train.py``: the run (rank 0's tracker, nested under
its sweep's run), the training data as a dataset input, MLflow's system-metrics monitor on every node, the
metric names of ``itr.tracking.names`` and the end-of-run artifacts."""
import json
import math
import time

import yaml

from itr import checkpoint as ckpt
from itr.plots import recall_at_k, training_curves
from itr.tracking import (JOURNAL, SystemMonitor, family_metrics, launch_info, make_tracker, manifest_dataset,
                          node_count, node_index, recipe_params, resolve_uri, run_name, run_tags, sweep_name,
                          train_metrics)


def start(tr):
    """The MLflow run of Trainer ``tr`` (the same one a resumed run keeps): params, tags, the dataset input,
    launch.json; system metrics on this node. Sets ``tr.tracker`` and ``tr.node_monitor``."""
    r, s = tr.recipe, tr.state
    nodes = node_count()
    node = node_index(tr.rank) if nodes > 1 else None
    tr.tracker = make_tracker(r, tr.main, run_id=s.run_id, default_name=run_name(tr.rd, tr.dataset),
                              journal=tr.out / JOURNAL, sweep=sweep_name(r.tracking), system_metrics=True, node=node)
    s.run_id = tr.tracker.run_id
    tr.node_monitor = None
    if nodes > 1 and r.tracking.enabled:  # every node's first process samples its node into rank 0's run
        from accelerate.utils import broadcast_object_list

        run_id = broadcast_object_list([s.run_id])[0]
        if not tr.main and tr.acc.local_process_index == 0:
            tr.node_monitor = SystemMonitor(run_id, resolve_uri(r.tracking.uri), node, resume=tr.resume_from is not None)
    if not tr.main:
        return
    tr.tracker.log_params(recipe_params(tr.rd))
    tr.tracker.set_tags({"model": r.model.name, "dataset": tr.dataset, **run_info(tr),
                         **run_tags(r.tracking, tr.world, tr.manifest)})
    tr.tracker.log_input(manifest_dataset(tr.manifest, f"{tr.dataset}/{r.data.train_split}", "training"))
    (tr.out / "launch.json").write_text(json.dumps(launch_info(), indent=1))  # argv, launcher, environment
    tr.tracker.log_artifact(tr.out / "launch.json")


def run_info(tr):
    """Tags of how the run was set up (also the start line's facts)."""
    zero = tr.ds_config.get("zero_optimization", {}).get("stage", 0) if tr.deepspeed else None
    return {"world_size": tr.world, "rank_batch": tr.rank_batch, "optimizer_impl": tr.optimizer_impl,
            "precision": tr.t.mixed_precision, "device": str(tr.device), "img_dim": tr.img_dim,
            "deepspeed": f"ZeRO-{zero} ({tr.ds_path})" if tr.deepspeed else "no",
            "zero_stage": zero if tr.deepspeed else "none", "train_pairs": tr.manifest["num_captions"],
            "vocab_size": len(tr.tokenizer), "run_dir": str(tr.out)}


def in_warmup(loss_cfg, epoch):
    """Whether ``epoch`` trains on summed violations before the switch to the hardest negative."""
    return bool(loss_cfg.max_violation) and epoch < loss_cfg.warmup_epochs


def log_step(tr, epoch, per_pair, lr, grad_norm, sps, memory):
    tr.tracker.log_metrics(train_metrics(per_pair, in_warmup(tr.recipe.loss, epoch), lr=lr, samples_per_sec=sps,
                                         grad_norm=float(grad_norm if grad_norm is not None else math.nan),
                                         epoch=epoch, skipped_steps=tr.state.skipped_steps, **memory),
                           step=tr.state.global_step)


def log_dev(tr, label, metrics):
    """Dev metrics at the optimizer step (the train curves' axis), with the epoch they close as ``dev/epoch``."""
    tr.tracker.log_metrics({**family_metrics("dev", metrics), "dev/epoch": label}, step=tr.state.global_step)


def log_test(tr, test):
    """``test/*``, and the tag ``test_scored`` (false: train.score_test=false or no test split; compare then ranks
    by dev)."""
    tr.tracker.set_tags({"test_scored": str(test is not None).lower()})
    if test is not None:
        tr.tracker.log_metrics(family_metrics("test", test), step=tr.state.global_step)


def artifacts(tr, test):
    """recipe.yaml, the plots, the run summary, the artifacts and the best checkpoint; the UI link."""
    r, s, out = tr.recipe, tr.state, tr.out
    (out / "recipe.yaml").write_text(yaml.safe_dump(tr.rd, sort_keys=False))
    title = f"{r.model.name} on {tr.dataset}"
    warm = [e for e in range(len(tr.epoch_steps)) if in_warmup(r.loss, e)]
    training_curves(s.history, out / "curves.png", title, warmup_epochs=len(warm),
                    warmup_step=sum(tr.epoch_steps[e] for e in warm) if warm else None)
    recall_at_k({f"dev (best, epoch {s.best_epoch})": s.best_dev, r.data.test_split: test},
                out / "recall_at_k.png", title)
    tp = tr.throughput
    tr.tracker.log_metrics({"train/samples_per_sec_mean": sum(tp) / len(tp) if tp else math.nan,
                            "train/wall_s": time.perf_counter() - tr.started, "train/epochs_completed": s.epoch},
                           step=s.global_step)
    for name in ("recipe.yaml", "results.json", "curves.png", "recall_at_k.png"):
        tr.tracker.log_artifact(out / name)
    if (out / "best").exists():
        tr.tracker.log_checkpoint(ckpt.resolve(out / "best"), getattr(r.tracking, "max_artifact_mb", None))
    if tr.tracker.run_id:
        tr._say(f"MLflow run {tr.tracker.run_id}: {tr.tracker.ui_hint()}")


def stop_node_monitor(tr):
    if getattr(tr, "node_monitor", None) is not None:
        tr.node_monitor.stop()
        tr.node_monitor = None
