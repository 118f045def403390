"""``itr compare``: MLflow runs side by side, best rsum first, as a table, CSV, Markdown and a plot.

Which numbers: ``--metric P`` compares the family ``P/rsum``, ``P/i2t_R1``, ...; ``dev`` (``dev_ema``) is the
dev evaluation that selected ``DIR/best`` (``DIR/best_ema``): the first epoch with the best ``eval.best_metric``,
not the last one. The default takes ``test/*`` (a training's test split, or an evaluation run of the recipe's
protocol) and, for a run without them, its one other family (e.g. ``test_5k/*``), else the best dev evaluation;
once any run was trained with ``train.score_test=false`` (a sweep choosing its recipe on dev) every run is
ranked by its best dev evaluation, so that no test score takes part in the choice. Recipe keys (MLflow params)
whose values differ between the runs, the swept ones, are columns when there are few. The plot shows the
compared rsum per run as bars and the dev rsum over epochs as lines. Runs logged with the names before the
prefixes (``test_rsum``, ``dev_rsum`` per epoch) compare alike (``itr.tracking.names``); a sweep's own run (the
parent of its members) is not a row.
"""
import csv as csv_module
import math
import sys
import time
from pathlib import Path

from itr.errors import ItrError

RECALLS = ("i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5", "t2i_R10")
COLUMNS = (("run", "run"), ("run_id", "id"), ("model", "model"), ("dataset", "dataset"), ("metric", "metric"),
           ("rsum", "rsum"), ("i2t_R1", "i2t R@1"), ("i2t_R5", "i2t R@5"), ("i2t_R10", "i2t R@10"),
           ("t2i_R1", "t2i R@1"), ("t2i_R5", "t2i R@5"), ("t2i_R10", "t2i R@10"), ("epochs", "epochs"),
           ("samples_per_sec", "samples/s"), ("wall_s", "wall time"))
NUMERIC = {"rsum", *RECALLS, "epochs", "samples_per_sec", "wall_s"}
DEV_FAMILIES = ("dev", "dev_ema")  # compared at their best epoch (what selected DIR/best, DIR/best_ema)
MAX_KEY_COLUMNS = 6  # more differing recipe keys: different recipes, not a sweep; no key columns


class CompareError(ItrError):
    pass


def _prefix_of(metrics, wanted):
    from itr.tracking.names import families

    if wanted:
        return wanted.rstrip("_/")
    found = families(metrics)
    return "test" if "test" in found else (found[0] if found else None)


def _history(client, run_id, key):
    try:
        return sorted(((m.step, m.value) for m in client.get_metric_history(run_id, key)), key=lambda x: x[0])
    except Exception:
        return []


def _dev(client, run_id, family="dev"):
    """[(epoch, rsum, step)] of a run's dev (or ``dev_ema``) evaluations: ``dev/rsum`` at optimizer steps with
    ``dev/epoch``, or (runs logged before the prefixes) ``dev_rsum`` at step = epoch."""
    from itr.tracking.names import history_keys

    for key in history_keys(f"{family}/rsum"):
        h = _history(client, run_id, key)
        if h and "/" in key:
            epochs = dict(_history(client, run_id, "dev/epoch"))
            return [(int(epochs.get(step, i + 1)), v, step) for i, (step, v) in enumerate(h)]
        if h:
            return [(step, v, step) for step, v in h]
    return []


def _steps(client, run_id, name):
    """{step: value} of metric ``name`` (or its name before the prefixes)."""
    from itr.tracking.names import history_keys

    for key in history_keys(name):
        h = dict(_history(client, run_id, key))
        if h:
            return h
    return {}


def _best_dev(client, run_id, family, evals, best_metric):
    """The row values of the evaluation that selected the best checkpoint: the first with the highest
    ``best_metric`` (the trainer's strict ``>``)."""
    if not evals:
        return {"metric": "", "rsum": None, **{k: None for k in RECALLS}}
    scores = ({step: v for _, v, step in evals} if best_metric == "rsum"
              else _steps(client, run_id, f"{family}/{best_metric}"))
    epoch, rsum, step = max(evals, key=lambda e: scores.get(e[2], -math.inf))
    return {"metric": f"{family} (epoch {epoch})", "rsum": rsum,
            **{k: _steps(client, run_id, f"{family}/{k}").get(step) for k in RECALLS}}


def run_row(client, run, metric=None):
    """One table row of ``run`` plus its dev rsum history [(epoch, rsum)]."""
    from itr.tracking.names import normalize

    m, tags, params = normalize(run.data.metrics), run.data.tags, run.data.params
    evals = _dev(client, run.info.run_id)
    dev = [(e, v) for e, v, _ in evals]
    prefix = _prefix_of(m, metric)
    row = {"run": run.info.run_name or run.info.run_id[:8], "run_id": run.info.run_id,
           "model": tags.get("model") or params.get("model.name", ""), "dataset": tags.get("dataset", ""),
           "sweep": tags.get("sweep", ""), "status": run.info.status, **params}
    best_metric = params.get("eval.best_metric") or "rsum"
    if prefix in DEV_FAMILIES:
        family_evals = evals if prefix == "dev" else _dev(client, run.info.run_id, prefix)
        row.update(_best_dev(client, run.info.run_id, prefix, family_evals, best_metric))
    elif prefix is not None and f"{prefix}/rsum" in m:
        row["metric"] = prefix
        row["rsum"] = m[f"{prefix}/rsum"]
        row.update({k: m.get(f"{prefix}/{k}") for k in RECALLS})
    else:  # no test metrics: the best dev evaluation
        row.update(_best_dev(client, run.info.run_id, "dev", evals, best_metric))
    if dev:
        row["epochs"] = max(e for e, _ in dev)
    elif tags.get("trained_epochs", "").isdigit():
        row["epochs"] = int(tags["trained_epochs"])
    elif "train/epochs_completed" in m:
        row["epochs"] = int(m["train/epochs_completed"])
    else:
        row["epochs"] = int(params["train.epochs"]) if params.get("train.epochs", "").isdigit() else None
    row["samples_per_sec"] = m.get("train/samples_per_sec_mean", m.get("train/samples_per_sec"))
    if row["samples_per_sec"] is not None and math.isnan(row["samples_per_sec"]):
        row["samples_per_sec"] = None
    end = run.info.end_time or (int(time.time() * 1000) if run.info.status == "RUNNING" else None)
    row["wall_s"] = (end - run.info.start_time) / 1000 if end and run.info.start_time else None
    return row, dev


def fetch_runs(client, experiment=None, filter_string=None, run_ids=None, max_runs=200):
    from mlflow.exceptions import MlflowException

    if run_ids:
        runs = []
        for r in run_ids:
            try:
                runs.append(client.get_run(r))
            except MlflowException as e:
                raise CompareError(f"run {r}: {e.message}") from None
        if filter_string:
            raise CompareError("--filter applies to an experiment's runs; with --runs, list the runs you want")
        return runs
    name = experiment or "itr"
    exp = client.get_experiment_by_name(name)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise CompareError(f"no MLflow experiment {name!r} at {client.tracking_uri}; experiments there: "
                           f"{', '.join(names) or 'none'}")
    try:
        runs = client.search_runs([exp.experiment_id], filter_string or "", max_results=max_runs)
    except MlflowException as e:
        raise CompareError(f"--filter {filter_string!r}: {e.message}") from None
    return [r for r in runs if r.data.tags.get("itr.kind") != "sweep"]  # a sweep's run holds no results


def _fmt(key, v):
    if v is None or v == "":
        return "-"
    if key == "wall_s":
        s = int(round(v))
        return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
    if key == "run_id":
        return v[:8]
    if key == "epochs":
        return str(int(v))
    if key == "samples_per_sec":
        return f"{v:.0f}"
    if key in NUMERIC:
        return f"{v:.1f}"
    return str(v)


def differing_keys(runs):
    """The recipe keys (MLflow params every run has) whose values differ between ``runs``, tracking.* aside;
    none when more than MAX_KEY_COLUMNS differ."""
    if len(runs) < 2:
        return []
    common = set.intersection(*(set(r.data.params) for r in runs))
    keys = sorted(k for k in common if not k.startswith("tracking.") and len({r.data.params[k] for r in runs}) > 1)
    return keys if len(keys) <= MAX_KEY_COLUMNS else []


def selection_metric(runs):
    """``dev`` when any run was trained with train.score_test=false (its sweep chooses on dev), else None."""
    return "dev" if any(r.data.params.get("train.score_test", "").lower() == "false" for r in runs) else None


def _columns(rows, keys=()):
    cols = list(COLUMNS)
    at = 4
    if any(r.get("sweep") for r in rows):
        cols.insert(at, ("sweep", "sweep"))
        at += 1
    cols[at:at] = [(k, k) for k in keys]
    return cols


def format_table(rows, keys=()):
    cols = _columns(rows, keys)
    cells = [[h for _, h in cols]] + [[_fmt(k, r.get(k)) for k, _ in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = []
    for j, line in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if cols[i][0] in NUMERIC else c.ljust(w)
                               for i, (c, w) in enumerate(zip(line, widths))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(rows, keys=()):
    cols = _columns(rows, keys)
    out = ["| " + " | ".join(h for _, h in cols) + " |",
           "|" + "|".join("---:" if k in NUMERIC else "---" for k, _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(_fmt(k, r.get(k)).replace("|", "\\|") for k, _ in cols) + " |")
    return "\n".join(out) + "\n"


def write_csv(rows, path, keys=()):
    cols = [k for k, _ in _columns(rows, keys)] + ["status"]
    with open(path, "w", newline="") as f:
        w = csv_module.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if r.get(k) is None else r.get(k) for k in cols])


def compare(experiment=None, filter_string=None, run_ids=None, tracking_uri=None, csv=None, markdown=None, plot=None,
            metric=None, max_runs=200, out=None):
    """Print the comparison table of the selected runs (best rsum first); write CSV / Markdown / plot. ``metric``:
    the family compared (default: ``selection_metric``, else each run's test family)."""
    from itr.tracking import connect, resolve_uri, ui_hint

    out = out or sys.stdout
    uri = resolve_uri(tracking_uri)
    client = connect(uri)
    runs = fetch_runs(client, experiment, filter_string, run_ids, max_runs)
    if not runs:
        raise CompareError(f"no runs matched (experiment {experiment or 'itr'}"
                           + (f", filter {filter_string!r}" if filter_string else "") + ")")
    chosen_on_dev = not metric and selection_metric(runs)
    metric = metric or selection_metric(runs)
    keys = differing_keys(runs)
    pairs = [run_row(client, r, metric) for r in runs]
    pairs.sort(key=lambda p: (p[0]["rsum"] is None, -(p[0]["rsum"] or 0.0)))
    rows = [p[0] for p in pairs]
    labels = {}
    for r in rows:  # unique labels for the plot legend
        r["label"] = r["run"] if r["run"] not in labels else f"{r['run']} ({r['run_id'][:6]})"
        labels[r["label"]] = True
    print(format_table(rows, keys), file=out)
    if chosen_on_dev:
        print("ranked by each run's best dev epoch: runs here were trained with train.score_test=false "
              "(--metric test ranks by test)", file=out)
    print(f"in the MLflow UI: {ui_hint(uri, compare=[(r.info.experiment_id, r.info.run_id) for r in runs])}", file=out)
    if csv:
        write_csv(rows, csv, keys)
        print(f"wrote {csv}", file=out)
    if markdown:
        Path(markdown).write_text(format_markdown(rows, keys))
        print(f"wrote {markdown}", file=out)
    if plot:
        from itr.plots import compare_runs

        compare_runs(rows, {r["label"]: dev for r, (_, dev) in zip(rows, pairs)}, plot, "rsum",
                     f"{len(rows)} runs" + (f", experiment {experiment}" if experiment else ""))
        print(f"wrote {plot}", file=out)
    return rows
