"""Logs that survive many ranks: progress only from rank 0, plain ASCII lines in files, readers that do not
fail on a character another process's write split."""
import io
import json

import pytest
import torch

from itr import progress
from itr.eval.stream import Streamer
from itr.logs import read_log
from itr.tracking.journal import read_journal

BLOCK = "\u2588".encode()  # tqdm's full block, 3 bytes in UTF-8


def _interleaved(path):
    """Rank 0's bar cut inside a block character by rank 1's line, as one SLURM log held it."""
    path.write_bytes(b"epoch 1/2:  40%|" + BLOCK[:2] + b"[rank1] step 7 done\n" + BLOCK[2:] + b" 4/10\nfinished\n")
    return path


def test_a_log_with_a_split_multibyte_character_is_read_without_error(tmp_path):
    log = _interleaved(tmp_path / "job.log")
    with pytest.raises(UnicodeDecodeError):
        log.read_text(encoding="utf-8")  # what failed before
    text = read_log(log)
    assert "[rank1] step 7 done" in text and text.endswith("finished\n") and "\ufffd" in text
    assert read_log(log, tail=9) == "finished\n"
    assert read_log(tmp_path / "none.log", missing_ok=True) == ""


def test_the_journal_reader_decodes_with_replacement(tmp_path):
    j = tmp_path / "mlflow_journal.jsonl"
    good = json.dumps({"op": "metrics", "step": 1}).encode()
    j.write_bytes(good + b"\n" + b'{"op": "params", "note": "' + BLOCK[:2] + b'"}\n' + good + b"\n")
    records = read_journal(j)
    assert [r["op"] for r in records] == ["metrics", "params", "metrics"]


class _Tty(io.StringIO):
    def isatty(self):
        return True


def _run_bar(n, file, **kw):
    with progress.bar(total=n, desc="embed images", unit="batch", file=file, **kw) as b:
        for i in range(n):
            b.update(1)
            b.set_postfix(loss=f"{i:.1f}")
    return file.getvalue()


def test_in_a_log_file_rank_0_writes_few_whole_ascii_lines(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    monkeypatch.setenv(progress.INTERVAL_ENV, "3600")
    out = _run_bar(500, io.StringIO())
    lines = out.splitlines()
    assert out.isascii() and "\r" not in out and "\x1b" not in out and out.endswith("\n")
    assert len(lines) == 2, lines  # the start and the end, not 500 redraws
    assert "0/500" in lines[0] and "500/500" in lines[-1] and "100%" in lines[-1] and "|###" in lines[-1]
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    lines = _run_bar(5, io.StringIO()).splitlines()
    counts = [ln.split("|")[2].split()[0] for ln in lines]  # every update once (the end again with its final rate)
    assert list(dict.fromkeys(counts)) == ["0/5", "1/5", "2/5", "3/5", "4/5", "5/5"] and len(counts) <= 7


@pytest.mark.parametrize("env", [{"RANK": "1"}, {"SLURM_PROCID": "3"}])
def test_other_ranks_draw_nothing(monkeypatch, env):
    monkeypatch.delenv("RANK", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert _run_bar(20, io.StringIO()) == "" and _run_bar(20, _Tty()) == ""
    monkeypatch.setenv("RANK", "0")  # the launcher's RANK wins over SLURM_PROCID (one launcher task per node)
    assert "20/20" in _run_bar(20, io.StringIO())


def test_a_terminal_gets_the_usual_redrawn_bar(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    out = _run_bar(20, _Tty(), mininterval=0)
    assert "\r" in out and "20/20" in out
    assert _run_bar(20, _Tty(), enabled=False) == ""


def test_the_eval_progress_goes_through_the_helper(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    img, cap = torch.randn(10, 4), torch.randn(50, 4)
    s = Streamer(lambda a, b: a @ b.T, img, cap, chunk=4, progress=True)
    seen = []
    s.each(s.grid, lambda i, t, scores: seen.append(i), "rank tiles")
    err = capsys.readouterr().err
    assert len(seen) == len(s.grid) > 2
    assert err.isascii() and "\r" not in err and "rank tiles: 100%" in err and "500/500" in err
    monkeypatch.setenv("RANK", "1")
    Streamer(lambda a, b: a @ b.T, img, cap, chunk=4, progress=True).each(s.grid, lambda *a: None, "rank tiles")
    assert capsys.readouterr().err == ""
