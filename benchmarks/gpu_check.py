"""One prepared GPU check: every GPU path of itr exercised and timed in a single short call.

GPU time comes in rare ~15-minute windows on a bare machine (python3 with a CUDA torch,
accelerate and transformers; no network). So the check is prepared and rehearsed here:

    python benchmarks/gpu_check.py --prepare                 # here: wheels + caption lengths into .whl/
    bash benchmarks/gpu_check.sh                             # there: install .whl/, run, $OUT/gpu_check.{json,md}
    python benchmarks/gpu_check.py --tiny --out DIR          # CPU rehearsal, seconds (tests/test_gpu_check.py)
    python benchmarks/gpu_check.py --record DIR/gpu_check.md # copy a run's figures into docs/performance.md

Sections (``benchmarks/gpu_sections.py``) run in order, each inside its own time budget and
guarded: an exception is reported with its traceback and the next section runs. Each ends
``ok`` (every check passed), ``fail`` (a check did not), ``error`` or ``skipped`` (with the
reason: out of time, no CUDA for a CUDA-only figure). ``--tiny`` runs the same code at toy
sizes on whatever device there is; figures from it mean nothing, only that the paths work.
"""
import argparse
import datetime
import json
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
WHEELS = ROOT / ".whl"
LENGTHS = "caption_lengths.txt"
DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- gpu_check:begin -->", "<!-- gpu_check:end -->"
TOTAL_S = 450.0  # the whole check, full mode: 7.5 of the 8 minutes one device call may take


class Skip(Exception):
    """Raised by a section (or its helpers) that cannot run here; the message says why."""


class Section:
    """What one section reports: figures (name -> value, unit, note), checks (name, ok, detail), notes."""

    def __init__(self, name, budget_s, tiny, device, work):
        self.name, self.tiny, self.device, self.work = name, tiny, device, Path(work)
        self.started = time.perf_counter()
        self.deadline = self.started + budget_s
        self.figures, self.checks, self.notes = {}, [], []

    @property
    def cuda(self):
        return self.device.startswith("cuda")

    def left(self):
        return self.deadline - time.perf_counter()

    def need_cuda(self, what):
        if not self.cuda:
            raise Skip(f"{what} needs a CUDA GPU")

    def figure(self, key, value, unit="", note=""):
        self.figures[key] = {"value": value, "unit": unit, "note": note}

    def check(self, name, ok, detail="", cuda_only=False):
        """Record a pass / fail; a ``cuda_only`` check off CUDA is recorded as skipped (ok None), not judged."""
        if cuda_only and not self.cuda:
            self.checks.append({"name": name, "ok": None, "detail": f"skipped: needs CUDA, ran on {self.device}"})
            return None
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})
        return ok

    def note(self, text):
        self.notes.append(text)

    def result(self, status, reason=None, trace=None):
        out = {"status": status, "seconds": round(time.perf_counter() - self.started, 2), "figures": self.figures,
               "checks": self.checks, "notes": self.notes}
        if reason:
            out["reason"] = reason
        if trace:
            out["traceback"] = trace
        return out


def run_sections(sections, args, device, work):
    """Run ``[(name, fn, budget_s)]`` in order; a section gets at most its budget and what is left overall."""
    end = time.perf_counter() + args.total_s
    results = {}
    for name, fn, budget in sections:
        if args.only and name not in args.only:
            continue
        left = end - time.perf_counter()
        sec = Section(name, min(budget, left), args.tiny, device, Path(work) / name)
        sec.work.mkdir(parents=True, exist_ok=True)
        print(f"[gpu_check] {name} (budget {min(budget, left):.0f} s)", flush=True)
        if left < 5:
            results[name] = sec.result("skipped", "out of time: the whole check's budget is spent")
            continue
        try:
            if os.environ.get("ITR_GPU_CHECK_FAIL") == name:  # rehearsal of the guard (tests)
                raise RuntimeError(f"planted failure in {name}")
            fn(sec)
            results[name] = sec.result("fail" if any(c["ok"] is False for c in sec.checks) else "ok")
        except Skip as e:
            results[name] = sec.result("skipped", str(e))
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:300]
            results[name] = sec.result("error", f"{type(e).__name__}: {first}", traceback.format_exc(limit=8)[-4000:])
        finally:
            _free_cuda()
        r = results[name]
        print(f"[gpu_check] {name}: {r['status']} in {r['seconds']} s" + (f" ({r['reason']})" if r.get("reason") else ""),
              flush=True)
    return results


def _free_cuda():
    try:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


# ----------------------------------------------------------------------------- report


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


_VERDICT = {True: "pass", False: "FAIL", None: "skipped"}


def markdown(report):
    """The GPU section of docs/performance.md, from a report."""
    env = report["sections"].get("env", {}).get("figures", {})
    gpu = env.get("gpu", {}).get("value", "no GPU")
    lines = [f"Measured by `benchmarks/gpu_check.py` ({report['mode']} mode) on {report['date']}: {gpu}, "
             f"torch {env.get('torch', {}).get('value', '?')}, CUDA {env.get('cuda', {}).get('value', '?')}; "
             f"total {report['seconds']:.0f} s.", ""]
    if report["mode"] == "tiny":
        lines += ["**A tiny-mode rehearsal: these figures are toy sizes and mean nothing.**", ""]
    for name, r in report["sections"].items():
        lines.append(f"### {name}: {r['status']} ({r['seconds']:.0f} s)")
        lines.append("")
        if r.get("reason"):
            lines += [f"- {r['reason']}", ""]
        if r["figures"]:
            lines += ["| figure | value | note |", "|---|---|---|"]
            lines += [f"| {k} | {_fmt(f['value'])} {f['unit']} | {f['note']} |" for k, f in r["figures"].items()]
        lines += [f"- {_VERDICT[c['ok']]}: {c['name']}" + (f" ({c['detail']})" if c["detail"] else "")
                  for c in r["checks"]]
        lines += [f"- {n}" for n in r["notes"]]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def record(md_path, doc=DOC):
    """Replace the text between the gpu_check markers of docs/performance.md with a run's Markdown."""
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc} has no {BEGIN} ... {END} block to fill")
    body = Path(md_path).read_text()
    head, rest = text.split(BEGIN, 1)
    doc.write_text(head + BEGIN + "\n" + body + rest[rest.index(END):])
    print(f"recorded {md_path} into {doc}")


# ----------------------------------------------------------------------------- --prepare (here, on a CPU machine)

# Distributions already on the bare GPU machine (the device library's KINDS.md, nvidia-h200, read 2026-11-17):
# carrying them again would shadow the machine's own builds (numpy, torch, ...).
DEVICE_HAS = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cycler cython einops
filelock fonttools frozenlist fsspec grpcio h11 h5py hf-xet httpcore httpx huggingface-hub idna jinja2 joblib
kiwisolver markdown markdown-it-py markupsafe matplotlib mdurl ml-dtypes mpmath msgpack multidict networkx ninja numpy
nvidia-ml-py packaging pandas pillow pip pluggy protobuf psutil py-cpuinfo pyarrow pygments pyparsing
python-dateutil pyyaml regex requests rich safetensors scikit-learn scipy setuptools six sympy tokenizers torch tqdm
transformers triton urllib3 werkzeug wheel wrapt yarl zipp""".split())
# What itr imports that the machine lacks (pinned to this environment's versions); deepspeed is an sdist,
# built here into a pure-Python wheel. typing_extensions travels anyway: pydantic needs a recent one.
CARRY = ("webdataset", "mlflow-skinny", "sqlalchemy", "alembic", "nltk", "pydantic", "hjson", "typing_extensions")
DEVICE_PYTHON = "3.12"  # python3 there (KINDS.md)
DEVICE_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                    "manylinux1_x86_64", "any")


def dist_name(wheel_file):
    """The normalised distribution name of a wheel file name (PEP 503)."""
    return re.sub(r"[-_.]+", "-", Path(wheel_file).name.split("-")[0]).lower()


def keep_wheel(wheel_file, device_has=DEVICE_HAS, always=("typing-extensions",)):
    name = dist_name(wheel_file)
    return name in always or name not in device_has


def prepare(dest=WHEELS, python=DEVICE_PYTHON, shared=ROOT.parent / "shared" / "data" / "f8k_pooled"):
    """Wheels for what the GPU machine lacks (binary ones for CPython ``python``), and the real caption-length
    distribution, into ``dest``. (``python`` other than the device's: a rehearsal in a local venv.)"""
    import subprocess
    from importlib.metadata import version

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    pins = [f"{name}=={version(name)}" for name in CARRY]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    with tempfile.TemporaryDirectory() as tmp:
        target = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
        target += [a for p in DEVICE_PLATFORMS for a in ("--platform", p)]
        subprocess.run([*pip, "download", *target, "-d", tmp, *pins], check=True)
        for w in Path(tmp).glob("*.whl"):
            if keep_wheel(w.name):
                w.rename(dest / w.name)
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dest),
                    f"deepspeed=={version('deepspeed')}"], check=True)
    caps = sorted(shared.glob("*_caps.txt"))
    if caps:  # words + <start>/<end>, as SCAN's data.py counts them
        lens = [len(line.split()) + 2 for c in caps for line in c.read_text().splitlines() if line.strip()]
        (dest / LENGTHS).write_text("\n".join(map(str, lens)) + "\n")
    else:
        print(f"warning: no captions under {shared}: the SCAN section will draw uniform lengths", file=sys.stderr)
    files = sorted(dest.iterdir())
    mb = sum(f.stat().st_size for f in files) / 2 ** 20
    print(f"{len(files)} files, {mb:.1f} MiB in {dest} (the device carries at most 64 MiB with the tree):")
    print("  " + " ".join(f.name.split("-")[0] for f in files))
    print("run there with carry=['.whl']:  bash benchmarks/gpu_check.sh")


# ----------------------------------------------------------------------------- main


def device_of(args):
    import torch

    if args.device:
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="folder for gpu_check.{json,md}")
    ap.add_argument("--tiny", action="store_true", help="toy sizes, seconds: the CPU rehearsal")
    ap.add_argument("--device", help="default: cuda when available, else cpu")
    ap.add_argument("--only", nargs="*", help="run only these sections")
    ap.add_argument("--total-s", type=float, help=f"time for the whole check (default {TOTAL_S:.0f} s; tiny: 300)")
    ap.add_argument("--lengths", default=str(WHEELS / LENGTHS), help="real caption lengths, one per line")
    ap.add_argument("--prepare", action="store_true", help="build the wheel folder (--wheels) here, then exit")
    ap.add_argument("--wheels", default=str(WHEELS), help="--prepare: the folder (default .whl/, git-ignored)")
    ap.add_argument("--python-version", default=DEVICE_PYTHON, help="--prepare: CPython of the binary wheels")
    ap.add_argument("--record", metavar="MD", help="copy a run's gpu_check.md into docs/performance.md, then exit")
    args = ap.parse_args(argv)
    if args.prepare:
        return prepare(Path(args.wheels), args.python_version)
    if args.record:
        return record(args.record)
    from gpu_sections import SECTIONS

    args.total_s = args.total_s or (300.0 if args.tiny else TOTAL_S)
    os.environ["ITR_GPU_CHECK_LENGTHS"] = args.lengths
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        sections = run_sections(SECTIONS, args, device_of(args), work)
    report = {"date": datetime.date.today().isoformat(), "mode": "tiny" if args.tiny else "full",
              "seconds": round(time.perf_counter() - t0, 1), "sections": sections}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    bad = [n for n, r in sections.items() if r["status"] in ("fail", "error")]
    print(f"[gpu_check] wrote {out / 'gpu_check.json'} and gpu_check.md; "
          + (f"failed: {', '.join(bad)}" if bad else "no section failed"), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
