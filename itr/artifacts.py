"""What a finished training run leaves beside its checkpoints: recipe.yaml, plots, MLflow artifacts."""
import math
import time

import yaml

from itr import checkpoint as ckpt
from itr.plots import recall_at_k, training_curves


def write_artifacts(tr, test):
    """recipe.yaml, curves.png, recall_at_k.png and results.json into the run directory and MLflow, and the best
    checkpoint (or a tag naming it); ``tr`` is the finishing ``itr.train.Trainer`` (rank 0)."""
    r, s, out = tr.recipe, tr.state, tr.out
    (out / "recipe.yaml").write_text(yaml.safe_dump(tr.rd, sort_keys=False))
    title = f"{r.model.name} on {tr.dataset}"
    training_curves(s.history, out / "curves.png", title)
    recall_at_k({f"dev (best, epoch {s.best_epoch})": s.best_dev, r.data.test_split: test},
                out / "recall_at_k.png", title)
    tp = tr.throughput
    tr.tracker.log_metrics({"train_samples_per_sec": sum(tp) / len(tp) if tp else math.nan,
                            "train_wall_s": time.perf_counter() - tr.started, "epochs_completed": s.epoch},
                           step=s.global_step)
    for name in ("recipe.yaml", "results.json", "curves.png", "recall_at_k.png"):
        tr.tracker.log_artifact(out / name)
    if (out / "best").exists():
        tr.tracker.log_checkpoint(ckpt.resolve(out / "best"), getattr(r.tracking, "max_artifact_mb", None))
    if tr.tracker.run_id:
        tr._say(f"MLflow run {tr.tracker.run_id}: {tr.tracker.ui_hint()}")
