"""Where a run comes from, in MLflow's own fields: the training data as a dataset input (the run list's
Datasets column) and the parent run (``mlflow.parentRunId``: a sweep's run above its members, a training
run above its evaluation runs).

The dataset is a plain dict (name, digest, source type, source, profile, context) so that the journal can
hold it and ``itr sync`` replay it; ``log_dataset`` turns it into MLflow's entities.
"""
import json

from itr.tracking.runinfo import source_tags

CONTEXT_TAG = "mlflow.data.context"  # MLflow's input tag for "training" / "validation" / "test"
PARENT_TAG = "mlflow.parentRunId"
SWEEP_KIND = "sweep"


def manifest_dataset(manifest, name, context="training"):
    """The dataset record of a shard manifest: digest ``manifest_digest`` (shard names, checksums, counts),
    source the shard directory, profile its counts."""
    from itr.data.manifest import manifest_digest

    profile = {k: manifest[k] for k in ("num_images", "num_captions", "feature_shape", "dtype") if k in manifest}
    profile["shards"] = len(manifest.get("shards", []))
    return {"name": name, "digest": manifest_digest(manifest), "source_type": "local",
            "source": json.dumps({"uri": str(manifest.get("root", ""))}), "profile": json.dumps(profile),
            "context": context}


def log_dataset(client, run_id, record):
    """``record`` (``manifest_dataset``) as a dataset input of the run; MLflow keeps one per name and digest, so
    logging it again (a resumed run, ``itr sync``) adds nothing."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    ds = Dataset(name=record["name"], digest=record["digest"], source_type=record["source_type"],
                 source=record["source"], profile=record.get("profile"))
    client.log_inputs(run_id, datasets=[DatasetInput(ds, tags=[InputTag(CONTEXT_TAG, record.get("context", "training"))])])


def existing_run(client, run_id):
    """``run_id`` if this store has it (and it is not deleted), else None: a parent tag must not dangle."""
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception:
        return None
    return run_id if run.info.lifecycle_stage == "active" else None


def sweep_parent(client, experiment_id, sweep):
    """The run above the members of ``sweep`` in this experiment, created by whichever member (or ``itr submit``)
    comes first. MLflow has no create-if-absent: a member creates one, then every member takes the oldest
    (start time, then id) and a member whose own new run lost deletes it, so racing members agree."""
    def parents():
        runs = client.search_runs([experiment_id], f"tags.`itr.kind` = '{SWEEP_KIND}' and tags.`itr.sweep_of` = "
                                                   f"'{_quote(sweep)}'", max_results=50)
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    found = parents()
    if found:
        return found[0].info.run_id
    tags = {**source_tags(), "itr.kind": SWEEP_KIND, "itr.sweep_of": sweep,
            "mlflow.note.content": f"sweep {sweep}: its members are the runs nested below (tag sweep = '{sweep}')"}
    mine = client.create_run(experiment_id, run_name=f"sweep {sweep}", tags=tags).info.run_id
    client.set_terminated(mine, "FINISHED")  # a container, not a process: it never runs
    chosen = parents()[0].info.run_id
    if chosen != mine:
        client.delete_run(mine)
    return chosen


def _quote(value):
    return str(value).replace("'", "\\'")
