"""The sections of ``benchmarks/gpu_check.py``, in the order they run (``SECTIONS`` at the end).

Each takes a ``gpu_check.Section`` (device, tiny, work folder, time left) and reports figures and
checks on it. Sizes come from ``SIZES[tiny or full]``: the full sizes are the papers' (36 x 2048
regions, batch 128, embed 1024, BERT-base, COCO 5K), the tiny ones run in seconds on a CPU.
Helpers shared by the sections live in ``gpu_common.py``.
"""
import json
import math
import time

import torch

from gpu_check import ROOT
from gpu_extract import extract_section
from gpu_common import (caption_lengths, compare_runs, launch, make_batches, peak_gib, reset_peak, step_recipe,
                        synthetic_data, sync, tiny_bert, train_steps)

SIZES = {
    "tiny": dict(batch=8, regions=4, img_dim=16, embed=32, word_dim=16, steps=2, timed_steps=2,
                 bert=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
                 synth=dict(train=60, dev=20, test=20, dim=16, regions=4), ds_steps=2,
                 scan=(48, 240, 8, 32), scan_slice=(16, 80), global_dim=32, galleries=[(200, 1000), (400, 2000)]),
    "full": dict(batch=128, regions=36, img_dim=2048, embed=1024, word_dim=300, steps=3, timed_steps=30,
                 bert=dict(),  # transformers' BertConfig defaults: BERT-base (12 x 768, 110 M parameters)
                 synth=dict(train=1000, dev=100, test=1000, dim=256, regions=36), ds_steps=10,
                 scan=(5000, 25000, 36, 1024), scan_slice=(256, 1280), global_dim=1024,
                 galleries=[(5000, 25000), (10000, 50000), (20000, 100000), (40000, 200000)]),
}
TOL = 1e-4  # fp32 CUDA vs CPU: relative difference of losses, first-step gradients and final weights


def sizes(s):
    return SIZES["tiny" if s.tiny else "full"]


def env(s):
    """What ran: GPU, torch / CUDA, the packages itr imports, whether NVIDIA apex imports."""
    import platform
    from importlib import import_module
    from importlib.metadata import PackageNotFoundError, version

    s.figure("python", platform.python_version())
    s.figure("torch", torch.__version__)
    s.figure("cuda", torch.version.cuda or "none")
    if s.cuda:
        p = torch.cuda.get_device_properties(0)
        s.figure("gpu", p.name)
        s.figure("gpu_memory", round(p.total_memory / 2 ** 30, 1), "GiB")
        s.figure("capability", f"{p.major}.{p.minor}")
        s.figure("cudnn", torch.backends.cudnn.version())
        s.figure("tf32 matmul", torch.backends.cuda.matmul.allow_tf32, "", "torch's default; the sections keep it")
    else:
        s.figure("gpu", f"none ({s.device})")
    for pkg in ("accelerate", "transformers", "deepspeed", "webdataset", "mlflow-skinny", "numpy"):
        try:
            s.figure(pkg, version(pkg))
        except PackageNotFoundError:
            s.figure(pkg, "missing")
    from itr.optim import _apex_fused_adam

    s.figure("apex", "apex.optimizers.FusedAdam imports" if _apex_fused_adam() else "absent: torch's fused AdamW is used")
    for mod in ("itr.train", "itr.eval.job", "deepspeed", "webdataset", "mlflow"):
        try:
            import_module(mod)
            s.check(f"import {mod}", True)
        except Exception as e:
            s.check(f"import {mod}", False, f"{type(e).__name__}: {e}")


def steps(s):
    """fp32 training steps of VSE-infinity and SCAN on the device equal the same steps on the CPU;
    bf16 and fp16 steps (with VSE-infinity's region drop and caption masking on) stay finite."""
    z = sizes(s)
    if not s.cuda:
        s.note("rehearsal: without CUDA both sides run on the CPU (equal by construction)")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for this comparison
    torch.backends.cudnn.allow_tf32 = False
    try:
        for name in ("vse_infty", "scan"):
            recipe, tok = step_recipe(name, z, augment=False)
            batches = make_batches(tok, z["steps"], z["batch"], z["regions"], z["img_dim"], seed=1)
            cpu = train_steps(recipe, tok, batches, z["img_dim"], "cpu", "no")
            dev = train_steps(recipe, tok, batches, z["img_dim"], s.device, "no")
            diffs = compare_runs(cpu, dev)
            for k, v in diffs.items():
                s.figure(f"{name} fp32 {k}", v, "", f"relative, {z['steps']} steps, {s.device} vs cpu")
            s.check(f"{name}: fp32 steps on {s.device} equal the CPU's within {TOL:g}",
                    max(diffs.values()) <= TOL, ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
            for mode in ("bf16", "fp16"):
                if mode == "fp16" and not s.cuda:  # fp16 autocast on a CPU is not what anyone runs
                    s.check(f"{name}: fp16 steps finite", None, cuda_only=True)
                    continue
                r, t = step_recipe(name, z, augment=True)
                out = train_steps(r, t, batches, z["img_dim"], s.device, mode)
                finite = all(math.isfinite(x) for x in out["losses"]) and out["finite_weights"]
                s.check(f"{name}: {mode} steps finite", finite, f"losses {[round(x, 4) for x in out['losses']]}, "
                                                                f"skipped {out['skipped']}")
            s.figure(f"{name} fp32 loss, step 1", cpu["losses"][0])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True  # torch's defaults again


def throughput(s):
    """VSE-infinity, BERT-base-sized random text encoder, 36 x 2048 regions, batch 128: samples/s in fp32 and
    bf16, torch's fused AdamW against foreach (and apex's FusedAdam when it imports)."""
    from itr.optim import _apex_fused_adam

    z = sizes(s)
    bert = tiny_bert(s.work / "bert", z["bert"])
    variants = [("no", "fused"), ("bf16", "fused"), ("bf16", "foreach")]
    if s.cuda and _apex_fused_adam() is not None:
        variants.append(("bf16", "apex"))
    lengths = caption_lengths()
    sps = {}
    for mode, impl in variants:
        if s.left() < 15 and sps:
            s.note(f"{mode}/{impl}: not measured (out of time)")
            continue
        recipe, tok = step_recipe("vse_infty", z, augment=True, text={"name": "hf_words", "path": str(bert)},
                                  optim={"name": "adamw", "lr": 5e-4, "weight_decay": 1e-4, "text_lr_mult": 0.1,
                                         "impl": impl})
        batches = make_batches(tok, 4, z["batch"], z["regions"], z["img_dim"], seed=2, lengths=lengths)
        out = train_steps(recipe, tok, batches, z["img_dim"], s.device, mode, timed=z["timed_steps"])
        key = f"{'fp32' if mode == 'no' else mode} {impl}"
        sps[key] = out["samples_per_s"]
        s.figure(f"{key} samples/s", round(out["samples_per_s"], 1), "pairs/s",
                 f"{out['optimizer']}; peak {out['peak_gib']:.2f} GiB" if s.cuda else out["optimizer"])
    if "fp32 fused" in sps and "bf16 fused" in sps:
        ratio = sps["bf16 fused"] / sps["fp32 fused"]
        s.figure("bf16 / fp32", round(ratio, 2), "x", "target >= 2x")
        s.check("bf16 >= 2x fp32 samples/s", ratio >= 2.0, f"{ratio:.2f}x", cuda_only=True)
    if "bf16 foreach" in sps and "bf16 fused" in sps:
        s.figure("fused / foreach AdamW", round(sps["bf16 fused"] / sps["bf16 foreach"], 3), "x", "bf16 steps")


def eval_job(s):
    """A tiny VSE++ trained by `itr train`; the evaluation job on the device gives the CPU's metrics."""
    from itr.checkpoint import load_for_eval
    from itr.data.sources import load_split
    from itr.eval.embed import embed_split
    from itr.eval.job import evaluate_model
    from itr.eval.metrics import KEYS
    from itr.eval.scores import similarity_matrix

    data = synthetic_data(s, sizes(s)["synth"])
    run = s.work / "run"
    launch(s, ["-m", "itr", "train", ROOT / "recipes/synthetic/vsepp_gru.yaml", *data["overrides"],
               "train.epochs=1", "tracking.enabled=false", "--out", run])
    found = []
    for dev in ("cpu", s.device):
        model, tok, recipe, _ = load_for_eval(run / "best", dev)
        split = load_split(data["root"], "test", recipe.data.image_size)
        t = time.perf_counter()
        metrics, _ = evaluate_model(model, split, tok, recipe.eval, dev)
        s.figure(f"evaluate on {dev}" + (" (again)" if len(found) == 2 and not s.cuda else ""),
                 round(time.perf_counter() - t, 2), "s")
        with torch.no_grad():
            img, cap = embed_split(model, split, tok, recipe.eval.batch_size, dev)
            sims = similarity_matrix(model.score, img, cap, recipe.eval.chunk_size, dev)
        found.append((metrics, sims))
    (m_cpu, sims_cpu), (m_dev, sims_dev) = found
    diff = float(abs(sims_cpu - sims_dev).max())
    s.figure("max |sims cuda - sims cpu|" if s.cuda else "max |sims - sims|", diff)
    same = all(m_cpu[k] == m_dev[k] for k in KEYS)
    s.check(f"metrics on {s.device} equal the CPU's", same,
            "" if same else f"rsum {m_dev['rsum']:.2f} vs {m_cpu['rsum']:.2f} (scores differ by {diff:.1e})")
    rsum = _eval_cli(s, run / "best", data["root"], s.work / "m.json")
    s.check("`itr eval` on the device reports the same rsum", abs(rsum - m_cpu["rsum"]) < 1e-6,
            f"{rsum:.2f} vs {m_cpu['rsum']:.2f}")
    s.figure("test rsum (tiny model)", round(m_cpu["rsum"], 2))


def deepspeed(s):
    """DeepSpeed ZeRO-2 and ZeRO-3 on one device through `accelerate launch`, bf16: steps, a checkpoint, a
    resume, and the consolidated checkpoint evaluated by `itr eval`."""
    z = sizes(s)
    data = synthetic_data(s, sizes(s)["synth"])
    env = {} if s.cuda else {"DS_ACCELERATOR": "cpu"}
    k = z["ds_steps"]
    for stage in (3,) if s.tiny else (2, 3):  # tiny: the harder stage only (tests/test_deepspeed.py has both)
        config = ROOT / "launch" / f"{'' if s.cuda else 'cpu_'}deepspeed_zero{stage}.yaml"
        out = s.work / f"zero{stage}"
        base = ["-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "1",
                "--main_process_port", "0", "-m", "itr", "train", ROOT / "recipes/synthetic/vse_infty.yaml",
                *data["overrides"], "train.epochs=1", "train.mixed_precision=bf16",
                f"tracking.uri=sqlite:///{s.work / 'mlflow.db'}", "--out", out]
        # cwd: the launch configs name their DeepSpeed JSON relative to the repository root
        first = launch(s, [*base, f"train.max_steps={k}"], env, cwd=ROOT)
        said = [line for line in first["stdout"].splitlines() if line.startswith("[itr]")][:1]
        s.check(f"ZeRO-{stage}: runs under DeepSpeed", f"deepspeed ZeRO-{stage}" in first["stdout"],
                said[0][:300] if said else "no [itr] line in the output")
        step = json.loads((out / "last" / "itr.json").read_text())["train_state"]["global_step"]
        s.check(f"ZeRO-{stage}: checkpoint at step {k}", step == k, f"step {step}")
        second = launch(s, [*base, "train.resume=latest"], env, cwd=ROOT)
        s.check(f"ZeRO-{stage}: resumes at step {k}", "resumed from" in second["stdout"] and f"step {k}" in second["stdout"])
        res = json.loads((out / "results.json").read_text())
        s.figure(f"ZeRO-{stage} wall, {k} steps / resume to {res['global_step']}",
                 f"{first['seconds']:.0f} / {second['seconds']:.0f}", "s", "with start-up")
        got = _eval_cli(s, out / "best", data["root"], out / "m.json")
        s.check(f"ZeRO-{stage}: `itr eval` of the consolidated checkpoint matches the run's test rsum",
                abs(got - res["test"]["rsum"]) < 1e-3, f"{got:.2f} vs {res['test']['rsum']:.2f}")


def _eval_cli(s, checkpoint, data, json_out):
    """`itr eval CHECKPOINT` on the test split as a user runs it (tiny mode: the same job in this process, to keep
    the suite's rehearsal short); returns its rsum."""
    args = ["eval", checkpoint, "--data", data, "--split", "test", "--json", json_out]
    if s.tiny:
        from itr.cli import main

        assert main([str(a) for a in args]) == 0
    else:
        out = launch(s, ["-m", "itr", *args])
        s.note(f"`itr eval {checkpoint.parent.name}/{checkpoint.name}`: {out['seconds']:.1f} s with start-up")
    return json.loads(json_out.read_text())["rsum"]


def scan_scale(s):
    """SCAN t2i all-pairs through the evaluation job at COCO-5K size (5,000 x 25,000, 36 x 1024, real caption
    lengths), against the reference's per-caption loop on a slice, extrapolated; the sub-chunk budget swept."""
    from gpu_common import reference_t2i, scan_inputs, scan_model
    from itr.eval.scores import similarity_matrix

    n_img, n_cap, R, D = sizes(s)["scan"]
    si, sc = sizes(s)["scan_slice"]
    torch.backends.cuda.matmul.allow_tf32 = False
    model = scan_model(D).to(s.device)
    img, cap, lens = scan_inputs(n_img, n_cap, R, D, s.device)
    part = img[:si], {"words": cap["words"][:sc], "lens": cap["lens"][:sc]}
    timing = {}
    for budget in (1 << 20, 1 << 23, 1 << 26):
        model.cfg.score_budget = budget
        similarity_matrix(model.score, *part, 1024, s.device)  # warm-up
        t = sync(s)
        ours = similarity_matrix(model.score, *part, 1024, s.device)
        timing[budget] = sync(s) - t
        s.figure(f"slice {si} x {sc}, score_budget 2^{budget.bit_length() - 1}", round(timing[budget], 3), "s")
    best = min(timing, key=timing.get)
    t = sync(s)
    ref = reference_t2i(img[:si], cap["words"][:sc], lens[:sc])
    t_ref = sync(s) - t
    err = float(abs(ours - ref).max())
    s.figure("max |ours - reference| (slice)", err)
    s.check("scores agree with the reference to 1e-5", err <= 1e-5, f"{err:.1e}")
    scale = (n_img * n_cap) / (si * sc)
    s.figure("reference loop, slice", round(t_ref, 3), "s", f"x {scale:.0f} -> {t_ref * scale:.0f} s estimated for all")
    model.cfg.score_budget = best
    if timing[best] * scale * 1.3 > s.left():
        s.note(f"the whole {n_img} x {n_cap} was not run: ~{timing[best] * scale:.0f} s projected, {s.left():.0f} s left")
        return
    reset_peak(s)
    t = sync(s)
    similarity_matrix(model.score, img, cap, 1024, s.device, progress=True)
    full = sync(s) - t
    s.figure(f"ours, all {n_img} x {n_cap}", round(full, 2), "s", f"score_budget 2^{best.bit_length() - 1}, tile 1024")
    s.figure("speedup vs the reference (extrapolated)", round(t_ref * scale / full, 1), "x")
    if s.cuda:
        s.figure("peak GPU memory", round(peak_gib(s), 2), "GiB")
    s.check("COCO 5K x 25K SCAN all-pairs under 60 s", full < 60, f"{full:.1f} s", cuda_only=True)


def global_ranks(s):
    """Global-embedding evaluation by the streamed job path (tiles scored on the device, folded into rank
    counters as they come) for the largest gallery that fits in the time left: seconds, GPU memory peak, host
    peak RSS."""
    import resource

    from itr.eval.job import score_embeddings

    d = sizes(s)["global_dim"]
    last = None
    for n, m in sizes(s)["galleries"]:
        if last and last[1] * (n * m) / last[0] * 1.3 > s.left():
            s.note(f"{n} x {m} not run: ~{last[1] * (n * m) / last[0]:.0f} s projected, {s.left():.0f} s left")
            break
        g = torch.Generator(s.device).manual_seed(0)
        img = torch.nn.functional.normalize(torch.randn(n, d, generator=g, device=s.device), dim=1)
        cap = torch.nn.functional.normalize(img.repeat_interleave(5, 0) + torch.randn(m, d, generator=g, device=s.device), dim=1)
        reset_peak(s)
        t = sync(s)
        metrics, _ = score_embeddings(lambda a, b: a @ b.t(), img, cap, "5k", 4096, s.device)
        took = sync(s) - t
        del img, cap
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        note = f"rsum {metrics['rsum']:.1f}; host peak RSS {rss:.1f} GiB" + (f"; GPU peak {peak_gib(s):.2f} GiB" if s.cuda else "")
        s.figure(f"{n} x {m}: streamed evaluation", f"{took:.2f}", "s", note)
        last = (n * m, took)


SECTIONS = [("env", env, 20), ("steps", steps, 60), ("throughput", throughput, 60), ("eval_job", eval_job, 50),
            ("scan_scale", scan_scale, 110), ("deepspeed", deepspeed, 150), ("global_ranks", global_ranks, 80),
            ("extract", extract_section, 60)]
