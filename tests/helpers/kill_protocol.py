"""Kill `itr train` at every point of the run-directory protocol, then again during the resume, then resume.

    python kill_protocol.py [--first] [--points PREFIX,...] RECIPE WORK [key=value ...]

Each scenario kills at a point's 2nd occurrence where there is one (a checkpoint exists before the kill); with
``--first`` at its 1st (the first-ever promotion of ``best``: no ``best/`` yet).

Writes WORK/report.json: the points of an uninterrupted run (WORK/ref, traced with ITR_FAULT_TRACE), and for
each scenario its run directory and how each run in it ended. The test compares the directories with WORK/ref.

Imports itr once and forks a child per run (a run is then about a second); the parent runs no torch op, so
forking is safe. Two scenarios run at a time, each in its own directory, one run after another within it.
"""
import json
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import nltk.tokenize  # noqa: E402,F401  what a run imports lazily (3 s of each child's time otherwise)
import torch._dynamo  # noqa: E402,F401
import transformers.integrations.deepspeed  # noqa: E402,F401

from itr.config import load_recipe  # noqa: E402
from itr.logs import read_log  # noqa: E402
from itr.train import train  # noqa: E402

RECOVERY = {"last: old moved aside": "last: recovered", "best: old moved aside": "best: recovered"}


def child(recipe_path, overrides, out, fault, trace, resume):
    os.environ.pop("ITR_FAULT", None)
    if fault:
        os.environ["ITR_FAULT"] = f"kill@{fault}"
    if trace:
        os.environ["ITR_FAULT_TRACE"] = str(trace)
    fd = os.open(str(out) + ".log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        recipe = load_recipe(recipe_path, list(overrides) + (["train.resume=latest"] if resume else []))
        train(recipe, out)
        code = 0
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start(recipe_path, overrides, out, fault=None, trace=None, resume=False):
    pid = os.fork()
    if pid == 0:
        child(recipe_path, overrides, out, fault, trace, resume)
    return pid


def ended(status):
    if os.WIFSIGNALED(status):
        return "killed" if os.WTERMSIG(status) == 9 else f"signal {os.WTERMSIG(status)}"
    return "ok" if os.WEXITSTATUS(status) == 0 else "failed"


def main(recipe_path, work, *overrides, prefixes=("",), first=False):
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    trace = work / "trace.txt"
    _, status = os.waitpid(start(recipe_path, overrides, work / "ref", trace=trace), 0)
    assert ended(status) == "ok", read_log(work / "ref.log", tail=3000)
    points = [p for p in dict.fromkeys(trace.read_text().split("\n"))
              if p and not p.startswith("step ") and p.startswith(tuple(prefixes))]
    counts = {p: trace.read_text().split("\n").count(p) for p in points}
    scenarios = []
    for p in points:
        kill = f"{p}:{2 if counts[p] > 1 and not first else 1}"
        scenarios.append((p, [kill, p, None]))
        if p in RECOVERY:
            scenarios.append((f"{p} / {RECOVERY[p]}", [kill, RECOVERY[p], None]))
    report = {"points": points, "counts": counts, "scenarios": {}}
    pending = list(enumerate(scenarios))
    running = {}  # pid -> (index, step)
    progress = {i: [] for i in range(len(scenarios))}

    def launch(i, step):
        name, faults = scenarios[i]
        out = work / f"s{i}"
        pid = start(recipe_path, overrides, out, fault=faults[step], resume=step > 0)
        running[pid] = (i, step)

    for _ in range(2):
        if pending:
            launch(pending.pop(0)[0], 0)
    while running:
        pid, status = os.wait()
        i, step = running.pop(pid)
        progress[i].append(ended(status))
        if step + 1 < len(scenarios[i][1]) and progress[i][-1] != "failed":
            launch(i, step + 1)
        elif pending:
            launch(pending.pop(0)[0], 0)
    for i, (name, faults) in enumerate(scenarios):
        report["scenarios"][name] = {"dir": str(work / f"s{i}"), "faults": faults, "runs": progress[i]}
    (work / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    args = sys.argv[1:]
    first = args[0] == "--first"
    args = args[first:]
    if args[0] == "--points":
        main(*args[2:], prefixes=tuple(args[1].split(",")), first=first)
    else:
        main(*args, first=first)
