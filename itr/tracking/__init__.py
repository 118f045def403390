"""MLflow logging for rank 0. Every other rank gets a tracker that does nothing.

Default store: ``sqlite:///<cwd>/mlflow.db``, which is also what a bare ``mlflow ui`` started in that
directory opens. A tracking failure warns and never stops training.

Everything the tracker sends is also appended to a journal in the run directory,
``DIR/mlflow_journal.jsonl``, whether or not the server answers. When the store is unreachable at start,
or stops answering during a run, the tracker warns once, stops calling it and keeps journaling;
``itr sync DIR`` replays the journal into the run afterwards (or into a new run when the run could never
be created). Replaying twice changes nothing.

Files:
  store.py    where the store is, connecting with short HTTP retries, experiments, batched writes
  tracker.py  Tracker (the one writer: training runs, ``itr eval``'s log_evaluation), NullTracker
  journal.py  the run directory's journal
  replay.py   ``itr sync``: the journal into the store
  runinfo.py  what a run records: git, versions, launch, memory, the user; param key names
  names.py    metric names (train/, dev/, test/, <split>_<protocol>/) and the old names they replace
  lineage.py  the training data as a dataset input, parent runs (sweeps, evaluations)
  system.py   MLflow's system-metrics monitor, one per node (live only, not journaled)

Links printed to the UI open its training view (``?workflowType=machine_learning``): MLflow 3's UI opens
experiments and runs in its GenAI view otherwise (it remembers the last view per browser, not per experiment).
"""
from itr.tracking.journal import JOURNAL, Journal, read_journal
from itr.tracking.lineage import PARENT_TAG, manifest_dataset, sweep_parent
from itr.tracking.names import eval_family, family_metrics, normalize, train_metrics
from itr.tracking.replay import sync
from itr.tracking.runinfo import (LAUNCH_ENV_NAMES, LAUNCH_ENV_PREFIXES, PACKAGES, git_state, launch_info,
                                  manifest_tags, memory_metrics, metric_prefix, node_count, package_versions,
                                  protocol_key, recipe_params, run_name, run_tags, source_tags, sweep_name,
                                  user_name)
from itr.tracking.store import (HTTP_LIMITS, connect, default_uri, ensure_experiment, limit_http_retries, log_batch,
                                resolve_uri)
from itr.tracking.system import SystemMonitor, node_index
from itr.tracking.tracker import (DEFAULT_MAX_ARTIFACT_MB, ML_VIEW, NullTracker, Tracker, checkpoint_limit_mb, dir_size,
                                  end_active, log_evaluation, make_tracker, ui_hint, ui_path)

__all__ = ["DEFAULT_MAX_ARTIFACT_MB", "HTTP_LIMITS", "JOURNAL", "LAUNCH_ENV_NAMES", "LAUNCH_ENV_PREFIXES", "ML_VIEW",
           "PACKAGES", "PARENT_TAG", "Journal", "NullTracker", "SystemMonitor", "Tracker", "checkpoint_limit_mb",
           "connect", "default_uri", "dir_size", "end_active", "ensure_experiment", "eval_family", "family_metrics",
           "git_state", "launch_info", "limit_http_retries", "log_batch", "log_evaluation", "make_tracker",
           "manifest_dataset", "manifest_tags", "memory_metrics", "metric_prefix", "node_count", "node_index",
           "normalize", "package_versions", "protocol_key", "read_journal", "recipe_params", "resolve_uri", "run_name",
           "run_tags", "source_tags", "sweep_name", "sweep_parent", "sync", "train_metrics", "ui_hint", "ui_path",
           "user_name"]
