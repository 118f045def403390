"""The run directory's MLflow journal: every record the tracker sends, one JSON object per line.

Written whether or not the store answers, so ``itr sync`` can replay what the store missed."""
import json
import warnings
from pathlib import Path

JOURNAL = "mlflow_journal.jsonl"


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
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():  # see itr.logs
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the last line of a killed run
    return records
