"""The one writer to MLflow. A Tracker creates, resumes or attaches to a run and logs into it while the
store answers, and into the journal always; every rank but 0 gets a NullTracker. ``log_evaluation``
(``itr eval``) is a short-lived Tracker on an existing run or on a new evaluation run (nested under the training
run that made the checkpoint)."""
import json
import os
import socket
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

from itr.tracking.journal import Journal
from itr.tracking.lineage import PARENT_TAG, existing_run, log_dataset, sweep_parent
from itr.tracking.runinfo import recipe_params, run_tags, source_tags
from itr.tracking.store import (ensure_experiment, limit_http_retries, log_artifact, log_batch, now_ms, quiet_mlflow,
                                resolve_uri, short)

DEFAULT_MAX_ARTIFACT_MB = 200.0
_ACTIVE = set()  # trackers with an open run, so a crash can close them (train.train)


def _metric_value(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


class NullTracker:
    run_id = None
    experiment_id = None
    uri = None
    online = False

    def log_metrics(self, metrics, step=None):
        pass

    def log_params(self, params):
        pass

    def set_tags(self, tags):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def log_input(self, record):
        pass

    def log_checkpoint(self, path, max_mb=None):
        pass

    def finish(self, status="FINISHED"):
        pass


class Tracker(NullTracker):
    """Rank 0's tracker: logs to MLflow while it answers, and to ``journal`` (a path) always.

    ``cfg``: uri, experiment, run_name (a recipe's ``tracking``). ``run_id``: resume that run (RUNNING
    again; the params it has are kept). ``attach``: only add to run ``run_id``, leaving its status and end
    alone (``itr eval --log-to-run``). ``strict``: a failing call raises instead of warning and going on
    with the journal only: for a short job whose caller reports the failure itself.

    A new run nests under ``parent`` (a run id, if the store has it), else under the run of ``sweep`` (created by
    the first member). ``system_metrics``: MLflow's system-metrics monitor on this node (``node``: its index when
    there are several; None on one), live only."""

    def __init__(self, cfg, run_id=None, default_name="itr", journal=None, attach=False, strict=False, parent=None,
                 sweep=None, system_metrics=False, node=None):
        from mlflow.tracking import MlflowClient

        quiet_mlflow()
        limit_http_retries()
        self.uri = resolve_uri(cfg.uri)
        self.experiment = cfg.experiment
        self.run_id, self.experiment_id, self.resumed = run_id, None, run_id is not None
        self.attached, self.strict = attach and run_id is not None, strict
        self.journal = Journal(journal) if journal else None
        self.online, self.client = False, None
        self._known_params = {}
        self.parent, self.sweep = parent, sweep
        run_name = None if run_id else (cfg.run_name or default_name)
        try:
            self.client = MlflowClient(self.uri)
            self._open(run_name)
            self.online = True
        except Exception as e:
            if strict:
                raise
            where = f" ({self.journal.path}; `itr sync {self.journal.path.parent}` uploads it later)" if self.journal else ""
            warnings.warn(f"MLflow unavailable at start ({self.uri}: {type(e).__name__}: {short(e)}); training "
                          f"continues and tracking is kept in the local journal{where}")
        if self.journal:
            self.journal.write("start", run_id=self.run_id, experiment=self.experiment, uri=self.uri,
                               run_name=run_name, resumed=self.resumed, online=self.online, ts=now_ms(),
                               host=socket.gethostname(), parent=parent, sweep=sweep)
            if not self.online:
                self.journal.write("offline", ts=now_ms(), error="unreachable at start")
        self.system = None
        if system_metrics and self.online and not self.attached:
            from itr.tracking.system import SystemMonitor

            self.system = SystemMonitor(self.run_id, self.uri, node, resume=self.resumed)
        if not strict:  # a strict tracker's caller closes it
            _ACTIVE.add(self)

    def _open(self, run_name):
        """Create the run, or find ``run_id``: a resumed run runs again, an attached one is left as it is."""
        if not self.attached:
            self.experiment_id = ensure_experiment(self.client, self.experiment, self.uri)
        if self.run_id is None:
            tags = source_tags()
            parent = self._parent()
            if parent:
                tags[PARENT_TAG] = parent
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            return
        run = self.client.get_run(self.run_id)
        self.experiment_id = run.info.experiment_id
        self._known_params = dict(run.data.params)
        if not self.attached:
            self.client.update_run(self.run_id, status="RUNNING")

    def _parent(self):
        """The run a new run nests under; a failure here only costs the link."""
        try:
            found = existing_run(self.client, self.parent)
            if found is None and self.sweep:
                found = sweep_parent(self.client, self.experiment_id, self.sweep)
            return found
        except Exception as e:
            warnings.warn(f"MLflow: no parent run for this run ({type(e).__name__}: {short(e)})")
            return None

    def _call(self, what, fn, *a, **kw):
        """``fn(client, *a, **kw)`` while the store answers. The first failure warns once and leaves the
        journal as the only record (or raises, when strict); returns whether the store got it."""
        if not self.online:
            return False
        try:
            fn(self.client, *a, **kw)
            return True
        except Exception as e:  # tracking must never cost a training run
            if self.strict:
                raise
            self.online = False
            where = (f"; metrics, params and tags go on into {self.journal.path} (`itr sync {self.journal.path.parent}` "
                     f"uploads them later)") if self.journal else ""
            warnings.warn(f"MLflow {what} failed ({self.uri}: {type(e).__name__}: {short(e)}); training continues "
                          f"without the tracking server{where}")
            if self.journal:
                self.journal.write("offline", ts=now_ms(), error=f"{what}: {type(e).__name__}: {short(e)}")
            return False

    def log_params(self, params):
        items = {k: ("" if v is None else str(v))[:6000] for k, v in params.items()}
        if self.journal:
            self.journal.write("params", params=items)
        if self.resumed:  # values logged before the restart stay; a changed one is not an error
            items = {k: v for k, v in items.items() if k not in self._known_params}
        self._call("log_params", log_batch, self.run_id, params=items)

    def log_metrics(self, metrics, step=None):
        m = {k: f for k, f in ((k, _metric_value(v)) for k, v in metrics.items()) if f is not None}
        ts, step = now_ms(), int(step or 0)
        if self.journal:
            self.journal.write("metrics", step=step, ts=ts, metrics=m)
        self._call("log_metrics", log_batch, self.run_id, metrics=[(k, v, ts, step) for k, v in m.items()])

    def set_tags(self, tags):
        t = {k: str(v)[:5000] for k, v in tags.items()}
        if self.journal:
            self.journal.write("tags", tags=t)
        self._call("set_tags", log_batch, self.run_id, tags=t)

    def log_artifact(self, path, artifact_path=None):
        path = Path(path).resolve()
        if self.journal:
            self.journal.write("artifact", path=str(path), artifact_path=artifact_path)
        what = "log_artifacts" if path.is_dir() else "log_artifact"
        self._call(what, log_artifact, self.run_id, path, artifact_path)

    def log_input(self, record):
        """A dataset input (``itr.tracking.lineage.manifest_dataset``): the run list's Datasets column."""
        if self.journal:
            self.journal.write("input", dataset=record)
        self._call("log_inputs", log_dataset, self.run_id, record)

    def log_checkpoint(self, path, max_mb=None):
        """The checkpoint directory as the ``best_checkpoint`` artifact, or only a reference tag when it is
        larger than ``max_mb`` (default: ITR_MLFLOW_MAX_ARTIFACT_MB, else 200 MB)."""
        path = Path(path).resolve()
        max_mb = checkpoint_limit_mb(max_mb)
        size_mb = dir_size(path) / 2 ** 20
        tags = {"best_checkpoint.path": f"{socket.gethostname()}:{path}", "best_checkpoint.size_mb": f"{size_mb:.1f}"}
        if size_mb <= max_mb:
            tags["best_checkpoint"] = "artifact:best_checkpoint"
            self.set_tags(tags)
            self.log_artifact(path, "best_checkpoint")
        else:
            tags["best_checkpoint"] = f"reference:{tags['best_checkpoint.path']} ({size_mb:.0f} MB > {max_mb:g} MB)"
            self.set_tags(tags)

    def finish(self, status="FINISHED"):
        _ACTIVE.discard(self)
        if self.system is not None:
            self.system.stop()
        if self.attached:
            return  # the run is someone else's to end
        if self.journal:
            self.journal.write("end", status=status, ts=now_ms())
        ok = self._call("end_run", lambda client: client.set_terminated(self.run_id, status))
        if not ok and self.journal:
            warnings.warn(f"MLflow ({self.uri}) did not get everything of this run; it is all in {self.journal.path}: "
                          f"upload it with `itr sync {self.journal.path.parent}" +
                          (f" --tracking-uri {self.uri}`" if not self.uri.startswith("sqlite") else "`"))

    def ui_hint(self):
        return ui_hint(self.uri, self.experiment_id, self.run_id)


def make_tracker(recipe, is_main, run_id=None, default_name="itr", journal=None, **options):
    """Rank 0's Tracker for a recipe (``options``: Tracker's parent, sweep, system_metrics, node)."""
    if not (is_main and recipe.tracking.enabled):
        return NullTracker()
    try:
        return Tracker(recipe.tracking, run_id=run_id, default_name=default_name, journal=journal, **options)
    except Exception as e:  # a bug in the tracker itself must not cost the run either
        warnings.warn(f"MLflow tracker failed to start ({type(e).__name__}: {e}); training continues without tracking")
        return NullTracker()


def end_active(status="FAILED"):
    """Close the runs of trackers still open (a crashed or interrupted training); never raises."""
    for t in list(_ACTIVE):
        try:
            t.finish(status)
        except Exception:
            _ACTIVE.discard(t)


ML_VIEW = "workflowType=machine_learning"  # MLflow 3's UI opens experiments in its GenAI view without it


def ui_path(experiment_id=None, run_id=None, compare=None):
    """The UI's address of a run, an experiment, or runs compared (``compare``: [(experiment id, run id)]),
    always in the training (machine learning) view."""
    if compare:
        runs = json.dumps([r for _, r in compare], separators=(",", ":"))
        exps = json.dumps(sorted({e for e, _ in compare}), separators=(",", ":"))
        return f"/#/compare-runs?runs={runs}&experiments={exps}&{ML_VIEW}"
    if experiment_id is None:
        return f"/#/runs/{run_id}?{ML_VIEW}" if run_id else ""
    run = f"/runs/{run_id}" if run_id else ""
    return f"/#/experiments/{experiment_id}{run}?{ML_VIEW}"


def ui_hint(uri, experiment_id=None, run_id=None, compare=None):
    """The command that opens the MLflow UI on a store, and the address of a run, an experiment or a comparison
    in it (``ui_path``)."""
    import shutil

    path = ui_path(experiment_id, run_id, compare)
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}{path}"
    exe = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    need = "" if _has_server() else "pip install 'itr[server]' (the MLflow UI), then "
    return f"{need}{exe} ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000{path}"


def _has_server():
    """The full mlflow distribution (UI, server) is installed, not only mlflow-skinny, itr's requirement."""
    from importlib import metadata

    try:
        metadata.distribution("mlflow")
        return True
    except metadata.PackageNotFoundError:
        return False


def checkpoint_limit_mb(value=None):
    if value is not None:
        return float(value)
    try:
        return float(os.environ.get("ITR_MLFLOW_MAX_ARTIFACT_MB", DEFAULT_MAX_ARTIFACT_MB))
    except ValueError:
        return DEFAULT_MAX_ARTIFACT_MB


def dir_size(path):
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- itr eval -> MLflow

def log_evaluation(metrics, family, *, uri=None, run_id=None, experiment=None, recipe=None, meta=None,
                   checkpoint=None, data=None, run_name=None, artifacts=(), title=""):
    """Log evaluation ``metrics`` (KEYS) as ``{family}/{key}`` (``itr.tracking.names``) into run ``run_id``, or into
    a new evaluation run in ``experiment``, nested under the training run of the checkpoint when the store has it.
    Returns the run id; a tracking failure warns and returns None."""
    from itr.tracking.names import family_metrics

    family = family.rstrip("_/")
    rd = (recipe if isinstance(recipe, dict) else _to_dict(recipe)) if recipe is not None else {}
    model = rd.get("model", {}).get("name", "model")
    dataset = rd.get("data", {}).get("name") or Path(str(data)).name
    cfg = SimpleNamespace(uri=resolve_uri(uri or rd.get("tracking", {}).get("uri")),
                          experiment=experiment or rd.get("tracking", {}).get("experiment") or "itr",
                          run_name=run_name or f"eval-{model}-{dataset}-{family}")
    trained_by = _trained_by(meta)
    try:
        tracker = Tracker(cfg, run_id=run_id, attach=run_id is not None, strict=True,
                          parent=trained_by.get("train_run_id"))
        tags = {f"eval.{family}_checkpoint": str(checkpoint), f"eval.{family}_data": str(data)}
        if run_id is None:  # a run of its own: say what was evaluated and with which recipe
            tags.update({"itr.kind": "eval", "model": model, "dataset": dataset, "checkpoint": str(checkpoint)})
            tags.update(run_tags(rd.get("tracking")))
            tags.update(trained_by)
            if rd:
                tracker.log_params(recipe_params(rd))
        tracker.log_metrics(family_metrics(family, metrics), step=0)
        tracker.set_tags(tags)
        for path in artifacts:
            tracker.log_artifact(path, "eval")
        tracker.finish()
        print(f"[itr] logged {family}/* metrics to MLflow run {tracker.run_id} ({cfg.uri}): "
              f"{tracker.ui_hint()}", flush=True)
        return tracker.run_id
    except Exception as e:
        warnings.warn(f"MLflow logging of the evaluation failed ({cfg.uri}: {type(e).__name__}: {short(e)}); "
                      f"the metrics are only printed / written to --json")
        return None


def _trained_by(meta):
    """Tags linking an evaluation run to the training that made the checkpoint."""
    train_state = (meta or {}).get("train_state", {})
    tags = {}
    if train_state.get("run_id"):
        tags["train_run_id"] = train_state["run_id"]
    if train_state.get("epoch") is not None:
        tags["trained_epochs"] = train_state["epoch"]
    return tags


def _to_dict(recipe):
    from itr.schema import to_dict

    return to_dict(recipe)
