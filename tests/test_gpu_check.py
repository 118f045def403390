"""benchmarks/gpu_check.py, rehearsed on the CPU so it never rots between GPU windows: --tiny runs every
section (CUDA-only checks reported as skipped), one section's failure does not hide the others, --prepare
carries only what the GPU machine lacks, and --record fills docs/performance.md's GPU block."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(out, *args, env=None):
    p = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--out", str(out), *args],
                       capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    report = json.loads((out / "gpu_check.json").read_text())
    return p, report


@pytest.mark.slow
def test_tiny_mode_runs_every_section_on_the_cpu(tmp_path):
    from gpu_sections import SECTIONS

    p, report = _run(tmp_path / "out")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert list(report["sections"]) == [name for name, _, _ in SECTIONS]
    for name, r in report["sections"].items():
        assert r["status"] == "ok", (name, r.get("reason"), r.get("traceback"), r["checks"])
        assert all(c["ok"] is not False for c in r["checks"]), (name, r["checks"])
    skipped = [c["name"] for r in report["sections"].values() for c in r["checks"] if c["ok"] is None]
    assert "bf16 >= 2x fp32 samples/s" in skipped and "COCO 5K x 25K SCAN all-pairs under 60 s" in skipped
    steps = report["sections"]["steps"]["figures"]
    assert steps["vse_infty fp32 gradients"]["value"] == 0.0  # cpu against cpu: the comparison itself works
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "tiny-mode rehearsal" in md and all(f"### {n}: ok" in md for n in report["sections"])


def test_a_failing_section_is_reported_and_the_rest_still_run(tmp_path):
    p, report = _run(tmp_path / "out", "--only", "env", "steps", "scan_scale",
                     env={"ITR_GPU_CHECK_FAIL": "steps"})
    assert p.returncode == 1
    s = report["sections"]
    assert s["steps"]["status"] == "error" and "planted failure in steps" in s["steps"]["reason"]
    assert "Traceback" in s["steps"]["traceback"]
    assert s["env"]["status"] == "ok" and s["scan_scale"]["status"] == "ok"
    assert "### steps: error" in (tmp_path / "out" / "gpu_check.md").read_text()


def test_an_exhausted_budget_skips_the_remaining_sections(tmp_path):
    _, report = _run(tmp_path / "out", "--only", "env", "global_ranks", "--total-s", "4")
    assert {r["status"] for r in report["sections"].values()} == {"skipped"}
    assert "out of time" in report["sections"]["global_ranks"]["reason"]


def test_prepare_carries_only_what_the_gpu_machine_lacks():
    keep = gpu_check.keep_wheel
    assert keep("webdataset-1.0.2-py3-none-any.whl") and keep("mlflow_skinny-3.17.2-py3-none-any.whl")
    assert keep("deepspeed-0.19.8-py3-none-any.whl") and keep("pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.whl")
    # already there: carrying them would shadow the machine's own builds
    assert not keep("numpy-2.5.5-cp312-cp312-manylinux_2_27_x86_64.whl") and not keep("torch-2.11.0-cp312-none.whl")
    assert not keep("PyYAML-6.0.4-cp312-cp312-manylinux2014_x86_64.whl")  # names are normalised (PEP 503)
    assert not keep("charset_normalizer-3.5.3-cp312-cp312-manylinux1_x86_64.whl")
    assert keep("typing_extensions-4.16.0-py3-none-any.whl")  # there, but too old for pydantic: carried anyway


def test_record_fills_the_gpu_block_of_the_performance_page(tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text(f"# Performance\n\n## GPU\n\n{gpu_check.BEGIN}\nold figures\n{gpu_check.END}\n\n## After\nkept\n")
    md = tmp_path / "gpu_check.md"
    md.write_text("new figures\n")
    gpu_check.record(md, doc)
    text = doc.read_text()
    assert "new figures" in text and "old figures" not in text and text.endswith("## After\nkept\n")
    assert text.count(gpu_check.BEGIN) == 1 and text.count(gpu_check.END) == 1
    doc.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="gpu_check:begin"):
        gpu_check.record(md, doc)


def test_the_real_performance_page_has_the_gpu_block():
    text = (ROOT / "docs" / "performance.md").read_text()
    assert text.index(gpu_check.BEGIN) < text.index(gpu_check.END)
