"""MLflow logging for rank 0. Every other rank gets a tracker that does nothing.

Default store: ``sqlite:///<cwd>/mlflow.db``, which is also what a bare ``mlflow ui``
started in that directory opens. A tracking failure warns and never stops training.

Everything the tracker sends is also appended to a journal in the run directory,
``DIR/mlflow_journal.jsonl`` (one JSON object per line, written by rank 0 whether or not
the server answers). When the store is unreachable at start, or stops answering during a
run, the tracker warns once, stops calling it and keeps journaling; ``itr sync DIR``
replays the journal into the run afterwards (or into a new run when the run could never be
created). Replaying twice changes nothing: metrics already in the store (same key, step,
timestamp and value), params already set and artifacts already uploaded are skipped.

MLflow's HTTP client retries a failed request 7 times with exponential backoff and waits
120 s per request by default: minutes of a stalled training for a dead server. The tracker
lowers both (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_TIMEOUT`` and
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``, unless already set in the environment): see
``HTTP_LIMITS``.
"""
import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

from itr.config import flatten

JOURNAL = "mlflow_journal.jsonl"
# what the tracker allows one HTTP request to MLflow: retries, seconds per request, backoff factor (s)
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
DEFAULT_MAX_ARTIFACT_MB = 200.0
PACKAGES = ("torch", "accelerate", "deepspeed", "transformers", "webdataset", "mlflow", "itr")
# environment variables that describe how a run was launched (none holds a secret)
LAUNCH_ENV_PREFIXES = ("ACCELERATE_", "SLURM_", "TORCHELASTIC_", "PET_", "ITR_", "DS_")
LAUNCH_ENV_NAMES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "NODE_RANK", "NNODES",
                    "PROCS_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS",
                    "MLFLOW_TRACKING_URI", "HOSTNAME")
_SECRET_WORDS = ("TOKEN", "PASSWORD", "SECRET", "KEY", "CRED", "AUTH")
_ACTIVE = set()  # trackers with an open run, so a crash can close them (train.train)


def default_uri():
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def resolve_uri(uri=None):
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


def limit_http_retries():
    """Short HTTP retries for MLflow's client (env vars it reads per request); the user's values win."""
    for k, v in HTTP_LIMITS.items():
        os.environ.setdefault(k, v)


def connect(uri):
    """An MlflowClient for ``uri`` that answered one request (short retries); ItrError naming the URI if not."""
    from mlflow.tracking import MlflowClient

    from itr.errors import ItrError

    _quiet_mlflow()
    limit_http_retries()
    client = MlflowClient(uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as e:
        raise ItrError(f"cannot reach the MLflow tracking store {uri} ({type(e).__name__}: {_short(e, 200)})") from None
    return client


def _quiet_mlflow():
    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)  # sqlite migrations are chatty
    # a refused connection is reported by our own warning; urllib3's retry lines add nothing
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def _now_ms():
    return int(time.time() * 1000)


def _metric_value(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


class Journal:
    """Append-only JSON lines; a line cut by a kill is skipped on reading."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._ok = True

    def write(self, op, **record):
        if not self._ok:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps({"op": op, **record}, default=str) + "\n")
        except OSError as e:
            warnings.warn(f"cannot write the MLflow journal {self.path} ({e}); it stops here")
            self._ok = False


def read_journal(path):
    records = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the last line of a killed run
    return records


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

    def log_checkpoint(self, path, max_mb=None):
        pass

    def finish(self, status="FINISHED"):
        pass


def ensure_experiment(client, name, uri):
    """The id of experiment ``name``, created if missing (artifacts beside a sqlite database)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if uri.startswith("sqlite:///"):
        # keep artifacts beside the database instead of in whatever directory we run from
        store = Path(uri[len("sqlite:///"):]).parent / "mlartifacts"
        try:
            return client.create_experiment(name, artifact_location=store.as_uri())
        except Exception:
            exp = client.get_experiment_by_name(name)  # created meanwhile by another process
            if exp is None:
                raise
            return exp.experiment_id
    return client.create_experiment(name)


def _source_tags():
    git = git_state()
    tags = {"mlflow.user": os.environ.get("USER", ""), "mlflow.source.type": "LOCAL",
            "mlflow.source.name": " ".join(sys.argv[:2])[:500]}
    if git["commit"] != "unknown":
        tags["mlflow.source.git.commit"] = git["commit"]
    return tags


class Tracker(NullTracker):
    """Rank 0's tracker: logs to MLflow while it answers, and to ``journal`` (a path) always."""

    def __init__(self, cfg, run_id=None, default_name="itr", journal=None):
        from mlflow.tracking import MlflowClient

        _quiet_mlflow()
        limit_http_retries()
        self.uri = resolve_uri(cfg.uri)
        self.experiment = cfg.experiment
        self.run_id, self.experiment_id, self.resumed = run_id, None, run_id is not None
        self.journal = Journal(journal) if journal else None
        self.online, self.client = False, None
        self._known_params = {}
        run_name = None if run_id else (cfg.run_name or default_name)
        try:
            self.client = MlflowClient(self.uri)
            self.experiment_id = ensure_experiment(self.client, cfg.experiment, self.uri)
            if run_id:
                run = self.client.get_run(run_id)
                self.experiment_id = run.info.experiment_id
                self._known_params = dict(run.data.params)
                self.client.update_run(run_id, status="RUNNING")
            else:
                run = self.client.create_run(self.experiment_id, run_name=run_name, tags=_source_tags())
                self.run_id = run.info.run_id
            self.online = True
        except Exception as e:
            where = f" ({self.journal.path}; `itr sync {self.journal.path.parent}` uploads it later)" if self.journal else ""
            warnings.warn(f"MLflow unavailable at start ({self.uri}: {type(e).__name__}: {_short(e)}); training "
                          f"continues and tracking is kept in the local journal{where}")
        if self.journal:
            self.journal.write("start", run_id=self.run_id, experiment=self.experiment, uri=self.uri,
                               run_name=run_name, resumed=self.resumed, online=self.online, ts=_now_ms(),
                               host=socket.gethostname())
            if not self.online:
                self.journal.write("offline", ts=_now_ms(), error="unreachable at start")
        _ACTIVE.add(self)

    def _call(self, what, method, *a, **kw):
        if not self.online:
            return False
        try:
            getattr(self.client, method)(*a, **kw)
            return True
        except Exception as e:  # tracking must never cost a training run
            self.online = False
            where = (f"; metrics, params and tags go on into {self.journal.path} (`itr sync {self.journal.path.parent}` "
                     f"uploads them later)") if self.journal else ""
            warnings.warn(f"MLflow {what} failed ({self.uri}: {type(e).__name__}: {_short(e)}); training continues "
                          f"without the tracking server{where}")
            if self.journal:
                self.journal.write("offline", ts=_now_ms(), error=f"{what}: {type(e).__name__}: {_short(e)}")
            return False

    def log_params(self, params):
        from mlflow.entities import Param

        items = {k: ("" if v is None else str(v))[:6000] for k, v in params.items()}
        if self.journal:
            self.journal.write("params", params=items)
        if self.resumed:  # values logged before the restart stay; a changed one is not an error
            items = {k: v for k, v in items.items() if k not in self._known_params}
        keys = list(items)
        for i in range(0, len(keys), 90):  # MLflow caps a batch at 100 params
            batch = [Param(k, items[k]) for k in keys[i:i + 90]]
            self._call("log_params", "log_batch", self.run_id, params=batch)

    def log_metrics(self, metrics, step=None):
        from mlflow.entities import Metric

        m = {k: f for k, f in ((k, _metric_value(v)) for k, v in metrics.items()) if f is not None}
        ts, step = _now_ms(), int(step or 0)
        if self.journal:
            self.journal.write("metrics", step=step, ts=ts, metrics=m)
        self._call("log_metrics", "log_batch", self.run_id,
                   metrics=[Metric(k, v, ts, step) for k, v in m.items()])

    def set_tags(self, tags):
        from mlflow.entities import RunTag

        t = {k: str(v)[:5000] for k, v in tags.items()}
        if self.journal:
            self.journal.write("tags", tags=t)
        self._call("set_tags", "log_batch", self.run_id, tags=[RunTag(k, v) for k, v in t.items()])

    def log_artifact(self, path, artifact_path=None):
        path = Path(path).resolve()
        if self.journal:
            self.journal.write("artifact", path=str(path), artifact_path=artifact_path)
        if path.is_dir():
            self._call("log_artifacts", "log_artifacts", self.run_id, str(path), artifact_path)
        else:
            self._call("log_artifact", "log_artifact", self.run_id, str(path), artifact_path)

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
        if self.journal:
            self.journal.write("end", status=status, ts=_now_ms())
        ok = self._call("end_run", "set_terminated", self.run_id, status)
        if not ok and self.journal:
            warnings.warn(f"MLflow ({self.uri}) did not get everything of this run; it is all in {self.journal.path}: "
                          f"upload it with `itr sync {self.journal.path.parent}" +
                          (f" --tracking-uri {self.uri}`" if not self.uri.startswith("sqlite") else "`"))

    def ui_hint(self):
        return ui_hint(self.uri, self.experiment_id, self.run_id)


def _short(e, n=300):
    s = " ".join(str(e).split())
    return s if len(s) <= n else s[:n] + "..."


def end_active(status="FAILED"):
    """Close the runs of trackers still open (a crashed or interrupted training); never raises."""
    for t in list(_ACTIVE):
        try:
            t.finish(status)
        except Exception:
            _ACTIVE.discard(t)


def ui_hint(uri, experiment_id=None, run_id=None):
    """The command that opens the MLflow UI on a store (and the address of a run in it)."""
    import shutil

    path = f"/#/experiments/{experiment_id}/runs/{run_id}" if run_id else ""
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}{path}"
    exe = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    return f"{exe} ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000{path}"


def make_tracker(recipe, is_main, run_id=None, default_name="itr", journal=None):
    if not (is_main and recipe.tracking.enabled):
        return NullTracker()
    try:
        return Tracker(recipe.tracking, run_id=run_id, default_name=default_name, journal=journal)
    except Exception as e:  # a bug in the tracker itself must not cost the run either
        warnings.warn(f"MLflow tracker failed to start ({type(e).__name__}: {e}); training continues without tracking")
        return NullTracker()


def recipe_params(recipe_dict):
    return {k: v for k, v in flatten(recipe_dict).items() if k != "train.resume"}


def run_name(recipe_dict, dataset):
    return f"{recipe_dict['model']['name']}-{dataset}-{time.strftime('%m%d-%H%M%S')}"


# ----------------------------------------------------------------------------- what a run records

def git_state(root=None):
    """{"commit", "dirty"} of the itr source tree; "unknown" without git or outside a checkout."""
    root = Path(root) if root else Path(__file__).resolve().parent.parent
    unknown = {"commit": "unknown", "dirty": "unknown"}

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root.resolve():
            return unknown  # e.g. an installed copy inside some other repository
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return unknown
        status = git("status", "--porcelain", "--", "itr", "shards", "setup.cfg", "setup.py", "pyproject.toml")
        dirty = "unknown" if status.returncode != 0 else str(bool(status.stdout.strip())).lower()
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return unknown


def package_versions(names=PACKAGES):
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name == "itr":
                import itr

                out[name] = itr.__version__
    return out


def node_count():
    """Nodes of this launch: SLURM_NNODES, else NNODES, else WORLD_SIZE / LOCAL_WORLD_SIZE, else 1."""
    for var in ("SLURM_NNODES", "SLURM_JOB_NUM_NODES", "NNODES"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    world, local = os.environ.get("WORLD_SIZE", ""), os.environ.get("LOCAL_WORLD_SIZE", "")
    if world.isdigit() and local.isdigit() and int(local) > 0:
        return max(1, math.ceil(int(world) / int(local)))
    return 1


def sweep_name(cfg=None):
    """The sweep a run belongs to: the recipe's tracking.sweep if the recipe has that key, else $ITR_SWEEP."""
    value = cfg.get("sweep") if isinstance(cfg, dict) else getattr(cfg, "sweep", None)
    return value or os.environ.get("ITR_SWEEP") or None


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


def launch_info():
    """sys.argv, the launcher's own command line and the launcher environment (no secrets)."""
    env = {k: v for k, v in sorted(os.environ.items())
           if (k in LAUNCH_ENV_NAMES or k.startswith(LAUNCH_ENV_PREFIXES)) and not any(w in k for w in _SECRET_WORDS)}
    info = {"argv": list(sys.argv), "executable": sys.executable, "cwd": os.getcwd(), "host": socket.gethostname(),
            "command": shlex.join([sys.executable, *sys.argv]), "env": env}
    if any(k in os.environ for k in ("LOCAL_RANK", "SLURM_PROCID", "TORCHELASTIC_RUN_ID")):
        try:  # the launcher (accelerate launch / torchrun / srun) is our parent
            with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
                info["launcher"] = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            pass
    return info


def manifest_tags(manifest):
    from itr.data.manifest import manifest_digest, sha256_file

    tags = {}
    if manifest.get("path"):
        tags["data.manifest"] = manifest["path"]
        try:
            tags["data.manifest_sha256"] = sha256_file(manifest["path"])[:16]
        except OSError:
            pass
    try:
        tags["data.manifest_digest"] = manifest_digest(manifest)
    except (KeyError, TypeError):
        pass
    return tags


def run_tags(cfg=None, world=None, manifest=None):
    """Tags describing where and with what a run ran: git, package versions, nodes, sweep, data, launch."""
    git = git_state()
    tags = {"git_commit": git["commit"], "git_dirty": git["dirty"], "nodes": node_count(),
            "launch_command": launch_info()["command"][:5000]}
    if world is not None:
        tags["world_size"] = world
    tags.update({f"version.{k}": v for k, v in package_versions().items()})
    sweep = sweep_name(cfg)
    if sweep:
        tags["sweep"] = sweep
    if manifest is not None:
        tags.update(manifest_tags(manifest))
    return tags


def memory_metrics(device=None):
    """Process RSS (MB) and, on CUDA, the peak allocated GPU memory (MB)."""
    out = {}
    try:
        import psutil

        out["cpu_rss_mb"] = psutil.Process().memory_info().rss / 2 ** 20
    except Exception:
        try:
            with open("/proc/self/statm") as f:
                out["cpu_rss_mb"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
        except (OSError, ValueError, IndexError):
            pass
    try:
        import torch

        if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
            out["gpu_mem_max_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    except Exception:
        pass
    return out


def protocol_key(protocol):
    return "".join(c for c in str(protocol) if c.isalnum())


def metric_prefix(split, protocol, extra=""):
    """``{split}_{protocol}_``: the key prefix of an evaluation, e.g. test_1k_ or testall_coco5fold_."""
    s = "".join(c if c.isalnum() or c == "_" else "_" for c in str(split))
    return f"{s}_{protocol_key(protocol)}{extra}_"


# ----------------------------------------------------------------------------- itr eval -> MLflow

def log_evaluation(metrics, prefix, *, uri=None, run_id=None, experiment=None, recipe=None, meta=None,
                   checkpoint=None, data=None, run_name=None, artifacts=(), title=""):
    """Log evaluation ``metrics`` (KEYS) as ``{prefix}{key}`` into run ``run_id``, or into a new evaluation run
    in ``experiment``. Returns the run id; a tracking failure warns and returns None."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from itr.eval.metrics import KEYS

    _quiet_mlflow()
    limit_http_retries()
    rd = recipe if isinstance(recipe, dict) else (None if recipe is None else _to_dict(recipe))
    uri = resolve_uri(uri or (rd or {}).get("tracking", {}).get("uri"))
    ts, new_run = _now_ms(), run_id is None
    try:
        client = MlflowClient(uri)
        tags = {f"eval.{prefix}checkpoint": str(checkpoint), f"eval.{prefix}data": str(data)}
        if run_id is None:
            exp_name = experiment or (rd or {}).get("tracking", {}).get("experiment") or "itr"
            exp_id = ensure_experiment(client, exp_name, uri)
            model = (rd or {}).get("model", {}).get("name", "model")
            dataset = (rd or {}).get("data", {}).get("name") or Path(str(data)).name
            run = client.create_run(exp_id, run_name=run_name or f"eval-{model}-{dataset}-{prefix.rstrip('_')}",
                                    tags=_source_tags())
            run_id = run.info.run_id
            tags.update({"itr.kind": "eval", "model": model, "dataset": dataset, "checkpoint": str(checkpoint)})
            tags.update(run_tags((rd or {}).get("tracking")))
            train_state = (meta or {}).get("train_state", {})
            if train_state.get("run_id"):
                tags["train_run_id"] = train_state["run_id"]
            if train_state.get("epoch") is not None:
                tags["trained_epochs"] = train_state["epoch"]
            if rd:
                params = [Param(k, ("" if v is None else str(v))[:6000]) for k, v in recipe_params(rd).items()]
                for i in range(0, len(params), 90):
                    client.log_batch(run_id, params=params[i:i + 90])
        client.log_batch(run_id, metrics=[Metric(f"{prefix}{k}", float(metrics[k]), ts, 0) for k in KEYS if k in metrics],
                         tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])
        for path in artifacts:
            client.log_artifact(run_id, str(path), "eval")
        if new_run:
            client.set_terminated(run_id)
        print(f"[itr] logged {prefix}* metrics to MLflow run {run_id} ({uri})", flush=True)
        return run_id
    except Exception as e:
        warnings.warn(f"MLflow logging of the evaluation failed ({uri}: {type(e).__name__}: {_short(e)}); "
                      f"the metrics are only printed / written to --json")
        return None


def _to_dict(recipe):
    from itr.config import to_dict

    return to_dict(recipe)


# ----------------------------------------------------------------------------- itr sync

def _segments(records):
    """Split a journal into trainings: a non-resumed start begins a new one."""
    segs = []
    for r in records:
        if r.get("op") == "start" and (not segs or not r.get("resumed")):
            segs.append([])
        if not segs:
            segs.append([])
        segs[-1].append(r)
    return segs


def _metric_id(step, ts, value):
    return int(step), int(ts), ("nan" if value is None or (isinstance(value, float) and math.isnan(value)) else float(value))


def sync(run_dir, uri=None, quiet=False):
    """Replay ``run_dir``'s MLflow journal into its run (or a new run if it was never created). Idempotent.

    Returns [{"run_id", "metrics", "params", "tags", "artifacts", "created"}] per training in the journal."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException
    from itr.errors import ItrError

    path = Path(run_dir)
    path = path if path.is_file() else path / JOURNAL
    if not path.is_file():
        raise ItrError(f"{path} does not exist: nothing to sync (a run directory of `itr train` with tracking on)")
    records = read_journal(path)
    journal = Journal(path)
    synced = {(r.get("segment"), r.get("uri")): r["run_id"] for r in records if r.get("op") == "synced"}
    out = []
    for i, seg in enumerate(_segments([r for r in records if r.get("op") != "synced"])):
        starts = [r for r in seg if r.get("op") == "start"]
        target_uri = uri or next((s["uri"] for s in starts if s.get("uri")), None) or default_uri()
        client = connect(target_uri)
        run_id, created = next((s["run_id"] for s in starts if s.get("run_id")), None), False
        if run_id is not None:
            try:
                client.get_run(run_id)
            except MlflowException:
                run_id = None  # not in this store (another server, or the run was never created here)
        if run_id is None and (i, target_uri) in synced:
            run_id = synced[(i, target_uri)]
        if run_id is None:
            first = starts[0] if starts else {}
            exp_id = ensure_experiment(client, first.get("experiment") or "itr", target_uri)
            run = client.create_run(exp_id, run_name=first.get("run_name") or "itr-synced",
                                    start_time=first.get("ts"), tags={**_source_tags(), "itr.synced_from": str(path)})
            run_id, created = run.info.run_id, True
            journal.write("synced", segment=i, uri=target_uri, run_id=run_id, ts=_now_ms())
        run = client.get_run(run_id)
        have_params = dict(run.data.params)
        params, tags, metrics, artifacts, end = {}, {}, [], [], None
        for r in seg:
            op = r.get("op")
            if op == "params":
                for k, v in r["params"].items():
                    params.setdefault(k, v)
            elif op == "tags":
                tags.update(r["tags"])
            elif op == "metrics":
                metrics += [(k, v, r["ts"], r["step"]) for k, v in r["metrics"].items()]
            elif op == "artifact":
                artifacts.append((r["path"], r.get("artifact_path")))
            elif op == "end":
                end = r
        params = {k: v for k, v in params.items() if k not in have_params}
        keys = sorted({k for k, *_ in metrics})
        have = {k: {_metric_id(m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, k)} for k in keys}
        new = [Metric(k, v, ts, step) for k, v, ts, step in metrics if _metric_id(step, ts, v) not in have[k]]
        new_dedup, seen = [], set()
        for m in new:
            mid = (m.key,) + _metric_id(m.step, m.timestamp, m.value)
            if mid not in seen:
                seen.add(mid)
                new_dedup.append(m)
        p = [Param(k, v) for k, v in params.items()]
        for j in range(0, len(p), 90):
            client.log_batch(run_id, params=p[j:j + 90])
        if tags:
            t = [RunTag(k, v) for k, v in tags.items()]
            for j in range(0, len(t), 90):
                client.log_batch(run_id, tags=t[j:j + 90])
        for j in range(0, len(new_dedup), 900):
            client.log_batch(run_id, metrics=new_dedup[j:j + 900])
        uploaded = 0
        for local, art_path in artifacts:
            local = Path(local)
            if not local.exists():
                continue
            name = f"{art_path}/{local.name}" if art_path and local.is_file() else (art_path or local.name)
            if _artifact_exists(client, run_id, name):
                continue
            if local.is_dir():
                client.log_artifacts(run_id, str(local), art_path)
            else:
                client.log_artifact(run_id, str(local), art_path)
            uploaded += 1
        if end is not None and client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, end.get("status", "FINISHED"), end_time=end.get("ts"))
        res = {"run_id": run_id, "uri": target_uri, "metrics": len(new_dedup), "params": len(p), "tags": len(tags),
               "artifacts": uploaded, "created": created}
        out.append(res)
        if not quiet:
            print(f"[itr] sync {path} -> run {run_id}{' (new)' if created else ''} at {target_uri}: "
                  f"{len(new_dedup)} metric values, {len(p)} params, {len(tags)} tags, {uploaded} artifacts added",
                  flush=True)
    return out


def _artifact_exists(client, run_id, name):
    parent = str(Path(name).parent)
    try:
        listed = client.list_artifacts(run_id, None if parent in ("", ".") else parent)
    except Exception:
        return False
    return any(a.path == name for a in listed)
