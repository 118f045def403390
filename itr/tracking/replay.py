"""``itr sync``: replay a run directory's journal into its MLflow run, or into a new run when the run
could never be created. Replaying twice changes nothing: metric values already in the store (same key,
step, timestamp and value), params already set, dataset inputs already there (MLflow keeps one per name and
digest) and artifacts already uploaded are skipped. A run created here nests under the parent the journal
names, or under its sweep's run in this store. System metrics are live only: they are not in the journal."""
import math
from pathlib import Path

from itr.tracking.journal import JOURNAL, Journal, read_journal
from itr.tracking.lineage import PARENT_TAG, existing_run, log_dataset, sweep_parent
from itr.tracking.runinfo import source_tags
from itr.tracking.store import connect, default_uri, ensure_experiment, log_artifact, log_batch, now_ms


def sync(run_dir, uri=None, quiet=False):
    """Replay ``run_dir``'s MLflow journal into its run (or a new run if it was never created). Idempotent.

    Returns [{"run_id", "uri", "metrics", "params", "tags", "artifacts", "created"}] per training in the journal."""
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
        run_id, created = _target_run(client, target_uri, starts, synced.get((i, target_uri)), path)
        if created:  # a second sync finds this run again
            journal.write("synced", segment=i, uri=target_uri, run_id=run_id, ts=now_ms())
        res = {"run_id": run_id, "uri": target_uri, **_replay(client, run_id, seg), "created": created}
        out.append(res)
        if not quiet:
            print(f"[itr] sync {path} -> run {run_id}{' (new)' if created else ''} at {target_uri}: "
                  f"{res['metrics']} metric values, {res['params']} params, {res['tags']} tags, "
                  f"{res['inputs']} dataset inputs, {res['artifacts']} artifacts added", flush=True)
    return out


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


def _target_run(client, uri, starts, synced_id, path):
    """(run id, created): the run the journal names if the store has it, else the one an earlier sync
    created, else a new run (named and started as the journal says)."""
    from mlflow.exceptions import MlflowException

    run_id = next((s["run_id"] for s in starts if s.get("run_id")), None)
    if run_id is not None:
        try:
            client.get_run(run_id)
            return run_id, False
        except MlflowException:
            pass  # not in this store (another server, or the run was never created here)
    if synced_id is not None:
        return synced_id, False
    first = starts[0] if starts else {}
    exp_id = ensure_experiment(client, first.get("experiment") or "itr", uri)
    tags = {**source_tags(), "itr.synced_from": str(path)}
    parent = existing_run(client, first.get("parent"))
    if parent is None and first.get("sweep"):
        parent = sweep_parent(client, exp_id, first["sweep"])
    if parent:
        tags[PARENT_TAG] = parent
    run = client.create_run(exp_id, run_name=first.get("run_name") or "itr-synced", start_time=first.get("ts"),
                            tags=tags)
    return run.info.run_id, True


def _collect(seg):
    """What one training journaled: params (first value wins), tags, metric values, dataset inputs, artifacts,
    its end."""
    params, tags, metrics, inputs, artifacts, end = {}, {}, [], [], [], None
    for r in seg:
        op = r.get("op")
        if op == "params":
            for k, v in r["params"].items():
                params.setdefault(k, v)
        elif op == "tags":
            tags.update(r["tags"])
        elif op == "metrics":
            metrics += [(k, v, r["ts"], r["step"]) for k, v in r["metrics"].items()]
        elif op == "input":
            inputs.append(r["dataset"])
        elif op == "artifact":
            artifacts.append((r["path"], r.get("artifact_path")))
        elif op == "end":
            end = r
    return params, tags, metrics, inputs, artifacts, end


def _replay(client, run_id, seg):
    """Send the store what it lacks of one training; the counts of what was added."""
    params, tags, metrics, inputs, artifacts, end = _collect(seg)
    run = client.get_run(run_id)
    params = {k: v for k, v in params.items() if k not in run.data.params}
    metrics = _new_metrics(client, run_id, metrics)
    tags.pop(PARENT_TAG, None)  # the run's own (a parent id of another store would dangle here)
    log_batch(client, run_id, metrics=metrics, params=params, tags=tags)
    have = {(d.dataset.name, d.dataset.digest) for d in (run.inputs.dataset_inputs if run.inputs else [])}
    new_inputs = [d for d in inputs if (d["name"], d["digest"]) not in have]
    for record in new_inputs:
        log_dataset(client, run_id, record)
    uploaded = _upload(client, run_id, artifacts)
    if end is not None and client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, end.get("status", "FINISHED"), end_time=end.get("ts"))
    return {"metrics": len(metrics), "params": len(params), "tags": len(tags), "inputs": len(new_inputs),
            "artifacts": uploaded}


def _metric_id(step, ts, value):
    return int(step), int(ts), ("nan" if value is None or (isinstance(value, float) and math.isnan(value)) else float(value))


def _new_metrics(client, run_id, metrics):
    """The journaled (key, value, ts, step) the store does not have yet, each once."""
    have = {k: {_metric_id(m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, k)}
            for k in sorted({k for k, *_ in metrics})}
    new, seen = [], set()
    for k, v, ts, step in metrics:
        mid = _metric_id(step, ts, v)
        if mid not in have[k] and (k, *mid) not in seen:
            seen.add((k, *mid))
            new.append((k, v, ts, step))
    return new


def _upload(client, run_id, artifacts):
    """Upload the journaled artifacts still on disk and not yet in the run; how many were uploaded."""
    uploaded = 0
    for local, art_path in artifacts:
        local = Path(local)
        if not local.exists():
            continue
        name = f"{art_path}/{local.name}" if art_path and local.is_file() else (art_path or local.name)
        if _artifact_exists(client, run_id, name):
            continue
        log_artifact(client, run_id, local, art_path)
        uploaded += 1
    return uploaded


def _artifact_exists(client, run_id, name):
    parent = str(Path(name).parent)
    try:
        listed = client.list_artifacts(run_id, None if parent in ("", ".") else parent)
    except Exception:
        return False
    return any(a.path == name for a in listed)
