"""MLflow logging for rank 0. Every other rank gets a tracker that does nothing.

Default store: ``sqlite:///<cwd>/mlflow.db``, which is also what a bare ``mlflow ui``
started in that directory opens. A tracking failure warns and never stops training.
"""
import os
import time
import warnings
from pathlib import Path

from itr.config import flatten


def default_uri():
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


class NullTracker:
    run_id = None
    experiment_id = None
    uri = None

    def log_metrics(self, metrics, step=None):
        pass

    def log_params(self, params):
        pass

    def set_tags(self, tags):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def finish(self, status="FINISHED"):
        pass


class Tracker(NullTracker):
    def __init__(self, cfg, run_id=None, default_name="itr"):
        import logging

        import mlflow

        logging.getLogger("alembic").setLevel(logging.WARNING)  # sqlite migrations are chatty
        self.mlflow = mlflow
        self.uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()
        mlflow.set_tracking_uri(self.uri)
        exp = mlflow.get_experiment_by_name(cfg.experiment)
        if exp is None and self.uri.startswith("sqlite:///"):
            # keep artifacts beside the database instead of in whatever directory we run from
            store = Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts"
            mlflow.create_experiment(cfg.experiment, artifact_location=store.as_uri())
        self.experiment_id = mlflow.set_experiment(cfg.experiment).experiment_id
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else (cfg.run_name or default_name))
        self.run_id = run.info.run_id
        self.resumed = run_id is not None
        self._ok = True

    def _safe(self, what, fn, *a, **kw):
        if not self._ok:
            return
        try:
            fn(*a, **kw)
        except Exception as e:  # tracking must never cost a training run
            warnings.warn(f"MLflow {what} failed ({type(e).__name__}: {e}); training continues without tracking")
            self._ok = False

    def log_params(self, params):
        items = [(k, ("" if v is None else str(v))[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 90):  # MLflow caps a batch at 100 params
            if self.resumed:  # values logged before the restart stay; a changed one is not an error
                try:
                    self.mlflow.log_params(dict(items[i:i + 90]))
                except Exception:
                    pass
            else:
                self._safe("log_params", self.mlflow.log_params, dict(items[i:i + 90]))

    def log_metrics(self, metrics, step=None):
        m = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._safe("log_metrics", self.mlflow.log_metrics, m, step=step)

    def set_tags(self, tags):
        self._safe("set_tags", self.mlflow.set_tags, {k: str(v) for k, v in tags.items()})

    def log_artifact(self, path, artifact_path=None):
        self._safe("log_artifact", self.mlflow.log_artifact, str(path), artifact_path)

    def finish(self, status="FINISHED"):
        self._safe("end_run", self.mlflow.end_run, status=status)

    def ui_hint(self):
        return ui_hint(self.uri, self.experiment_id, self.run_id)


def ui_hint(uri, experiment_id=None, run_id=None):
    """The command that opens the MLflow UI on a store (and the address of a run in it)."""
    import shutil
    import sys

    exe = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    url = "http://127.0.0.1:5000" + (f"/#/experiments/{experiment_id}/runs/{run_id}" if run_id else "")
    return f"{exe} ui --backend-store-uri {uri} --port 5000   # then open {url}"


def make_tracker(recipe, is_main, run_id=None, default_name="itr"):
    if not (is_main and recipe.tracking.enabled):
        return NullTracker()
    try:
        return Tracker(recipe.tracking, run_id=run_id, default_name=default_name)
    except Exception as e:
        warnings.warn(f"MLflow unavailable at start ({type(e).__name__}: {e}); training continues without tracking")
        return NullTracker()


def recipe_params(recipe_dict):
    return {k: v for k, v in flatten(recipe_dict).items() if k != "train.resume"}


def run_name(recipe_dict, dataset):
    return f"{recipe_dict['model']['name']}-{dataset}-{time.strftime('%m%d-%H%M%S')}"
