"""Training-step throughput: itr's step against a bare hand-written torch loop, same model, same batches.

    python benchmarks/train_throughput.py [--steps 20] [--batch 128] [--regions 36] [--img-dim 2048]

Prints samples/s of both and the ratio (target: itr's overhead within 5%), for 1 process and,
through `accelerate launch`, 2 processes (CPU: gloo). The loops alternate in rounds inside
one process so that machine noise hits all alike; the median round is reported. With 2
processes the overhead is measured with per-rank negatives, as the bare loop mines them;
the cost of itr's default global-batch negatives (an all-gather with gradients) is a
separate column, since it is a different loss, not overhead.

"itr" is the trainer's own code path: accelerate-prepared model and optimizer, ``itr.train.train_step``
(global-batch negatives gathered with gradients), the precision helper, gradient clipping, the
per-step stop-signal check, and loss logging every 10 steps. "bare" is VSE++'s loss and an Adam
step written inline (plain DDP when there are 2 processes), without any of that.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch


def make_model(args, vocab=1000, global_negatives=False):
    from itr.config import load_recipe
    from itr.data.text import SPECIALS, WordVocab
    from itr.models import build_model

    recipe = load_recipe(raw={"model": {"name": "vsepp", "embed_dim": args.embed,
                                        "text": {"name": "gru", "word_dim": 300}},
                              "optim": {"name": "adam", "lr": 2e-4},
                              "loss": {"global_negatives": global_negatives}})
    tok = WordVocab(SPECIALS + [f"w{i}" for i in range(vocab - len(SPECIALS))])
    torch.manual_seed(0)
    return recipe, build_model(recipe, args.img_dim, tok), tok


def make_batches(args, n, rank, world, vocab=1000):
    g = torch.Generator().manual_seed(100 + rank)
    b = args.batch // world
    out = []
    for _ in range(n):
        lens = torch.randint(8, 16, (b,), generator=g)
        ids = torch.randint(4, vocab, (b, int(lens.max())), generator=g)
        out.append({"feats": torch.randn(b, args.regions, args.img_dim, generator=g).half(), "text_ids": ids,
                    "text_lens": lens, "img_ids": torch.arange(rank * b, (rank + 1) * b)})
    return out


def bare_loop(model, batches, steps, world):
    """The hand-written baseline: forward, VSE++ max-violation hinge, backward, clip, Adam."""
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, fused=True)

    def step(batch):
        out = model(batch, mode="embed")
        img, cap = out["img"], out["cap"]
        scores = img @ cap.t()
        d = scores.diag()
        mask = torch.eye(len(d), dtype=torch.bool)
        cost_c = (0.2 + scores - d[:, None]).clamp(min=0).masked_fill(mask, 0)
        cost_i = (0.2 + scores - d[None, :]).clamp(min=0).masked_fill(mask, 0)
        loss = cost_c.max(1).values.sum() + cost_i.max(0).values.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()

    return step


def itr_loop(model, recipe, world):
    from itr.distributed import all_reduce_sum, make_accelerator
    from itr.optim import make_optimizer
    from itr.precision import Precision
    from itr.step import Stop, train_step

    acc = make_accelerator()
    opt, _ = make_optimizer(model, recipe.optim)
    model, opt = acc.prepare(model, opt)
    precision, stop = Precision("no", "cpu"), Stop()
    count = {"n": 0}

    def step(batch):
        loss = train_step(model, [batch], 1, acc, precision, world)
        precision.unscale_(opt)
        acc.clip_grad_norm_(model.parameters(), 2.0)
        precision.step(opt)
        opt.zero_grad(set_to_none=True)
        count["n"] += 1
        if count["n"] % 10 == 0:
            all_reduce_sum(loss.reshape(1)).item()
        stop.requested("cpu")

    return step


def measure(step, batches, steps):
    for b in batches[:2]:  # warm-up
        step(b)
    t0 = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    return time.perf_counter() - t0


def run(args):
    """Alternate the two loops for ``args.rounds`` rounds; return samples/s of each (median round)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    recipe, m_bare, tok = make_model(args)
    _, m_itr, _ = make_model(args)
    batches = make_batches(args, 4, rank, world)
    loops = {"bare": bare_loop(m_bare, batches, args.steps, world), "itr": itr_loop(m_itr, recipe, world)}
    if world > 1:
        recipe_g, m_glob, _ = make_model(args, global_negatives=True)
        loops["itr_global"] = itr_loop(m_glob, recipe_g, world)
    times = {k: [] for k in loops}
    for _ in range(args.rounds):
        for name, step in loops.items():
            if world > 1:
                torch.distributed.barrier()
            times[name].append(measure(step, batches, args.steps))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {k: args.steps * args.batch / v for k, v in med.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128, help="global batch")
    ap.add_argument("--regions", type=int, default=36)
    ap.add_argument("--img-dim", type=int, default=2048)
    ap.add_argument("--embed", type=int, default=1024)
    ap.add_argument("--worker", help="internal: write this process's result here (2-process run)")
    ap.add_argument("--no-2proc", action="store_true")
    args = ap.parse_args()
    if args.worker:
        res = run(args)
        if int(os.environ.get("RANK", "0")) == 0:
            with open(args.worker, "w") as f:
                json.dump(res, f)
        return
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = [("1 process", run(args))]
    if not args.no_2proc:
        out = "/tmp/itr_bench_2proc.json"
        accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2)), ACCELERATE_USE_CPU="true")
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--dynamo_backend", "no", "--mixed_precision", "no", "--main_process_port", "0", __file__,
               "--worker", out, *sys.argv[1:]]
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        rows.append(("2 processes", json.load(open(out))))
    print(f"VSE++ step, global batch {args.batch}, {args.regions} x {args.img_dim} regions, embed {args.embed}, "
          f"GRU text; {args.rounds} rounds x {args.steps} steps, median round")
    print(f"{'':12} {'bare torch':>12} {'itr':>12} {'itr / bare':>11} {'itr, global negatives':>22}")
    for name, r in rows:
        g = f"{r['itr_global']:10.1f}/s ({r['itr_global'] / r['bare']:.3f})" if "itr_global" in r else "-"
        print(f"{name:12} {r['bare']:10.1f}/s {r['itr']:10.1f}/s {r['itr'] / r['bare']:11.3f} {g:>22}")
    if len(rows) == 2:
        print(f"2 processes / 1 process (itr): {rows[1][1]['itr'] / rows[0][1]['itr']:.3f}")


if __name__ == "__main__":
    main()
