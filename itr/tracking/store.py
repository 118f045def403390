"""The MLflow store: where it is, how to reach it without stalling, its experiments, and the one place
that cuts writes into batches MLflow accepts (used by the Tracker and by ``itr sync``).

MLflow's HTTP client retries a failed request 7 times with exponential backoff and waits 120 s per
request by default: minutes of a stalled training for a dead server. ``limit_http_retries`` lowers
both (``HTTP_LIMITS``) unless the user set them in the environment.
"""
import os
import time
from pathlib import Path

# what one HTTP request to MLflow may cost: retries, seconds per request, backoff factor (s)
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# MLflow refuses a log_batch of more than 100 params, 100 tags or 1000 metrics
BATCH_PARAMS, BATCH_TAGS, BATCH_METRICS = 90, 90, 900


def default_uri():
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def resolve_uri(uri=None):
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


def limit_http_retries():
    """Short HTTP retries for MLflow's client (env vars it reads per request); the user's values win."""
    for k, v in HTTP_LIMITS.items():
        os.environ.setdefault(k, v)


def quiet_mlflow():
    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)  # sqlite migrations are chatty
    # MLflow prints its own run link at the end of a run, in the UI's default (GenAI) view: ours opens the
    # training view (itr.tracking.tracker.ui_path)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # a refused connection is reported by our own warning; urllib3's retry lines add nothing
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def connect(uri):
    """An MlflowClient for ``uri`` that answered one request (short retries); ItrError naming the URI if not."""
    from mlflow.tracking import MlflowClient

    from itr.errors import ItrError

    quiet_mlflow()
    limit_http_retries()
    client = MlflowClient(uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as e:
        raise ItrError(f"cannot reach the MLflow tracking store {uri} ({type(e).__name__}: {short(e, 200)})") from None
    return client


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


def log_batch(client, run_id, metrics=(), params=None, tags=None):
    """Write ``params`` and ``tags`` ({key: str}) and ``metrics`` ([(key, value, timestamp_ms, step)]) in
    batches under MLflow's caps: params, then tags, then metrics. Nothing is sent for what is empty."""
    from mlflow.entities import Metric, Param, RunTag

    batches = [("params", [Param(k, v) for k, v in (params or {}).items()], BATCH_PARAMS),
               ("tags", [RunTag(k, v) for k, v in (tags or {}).items()], BATCH_TAGS),
               ("metrics", [Metric(*m) for m in metrics], BATCH_METRICS)]
    for kind, items, size in batches:
        for i in range(0, len(items), size):
            client.log_batch(run_id, **{kind: items[i:i + size]})


def log_artifact(client, run_id, path, artifact_path=None):
    """A file, or the content of a directory, under ``artifact_path`` of the run's artifacts."""
    if Path(path).is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def now_ms():
    return int(time.time() * 1000)


def short(e, n=300):
    """An exception's message on one line, at most ``n`` characters."""
    s = " ".join(str(e).split())
    return s if len(s) <= n else s[:n] + "..."
