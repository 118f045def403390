"""Helpers of the GPU check's sections (``gpu_sections.py``): recipes and batches at a given size, the
trainer's own step on a device, subprocess launches inside a section's time budget, SCAN inputs."""
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from gpu_check import ROOT, Skip

WORDS = [f"w{i}" for i in range(400)]


def sync(s):
    """perf_counter after the device finished its queued work (timings of CUDA code)."""
    if s.cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


def reset_peak(s):
    if s.cuda:
        torch.cuda.reset_peak_memory_stats()


def peak_gib(s):
    return torch.cuda.max_memory_allocated() / 2 ** 30 if s.cuda else float("nan")


def caption_lengths():
    """Real caption lengths (tokens with <start>/<end>) carried by --prepare, or None (uniform 8..16)."""
    p = Path(os.environ.get("ITR_GPU_CHECK_LENGTHS", ""))
    if p.is_file():
        lens = [int(x) for x in p.read_text().split()]
        return torch.tensor(lens) if lens else None
    return None


# ----------------------------------------------------------------------------- training steps


def step_recipe(name, z, augment, text=None, optim=None):
    """(recipe, tokenizer) of ``name`` (vse_infty or scan) at sizes ``z``; ``augment``: VSE-infinity's region drop
    and caption masking on (their random draws are made on the device, so CPU and CUDA runs differ)."""
    from itr.config import load_recipe
    from itr.models import make_tokenizer

    text = text or {"name": "gru_words", "word_dim": z["word_dim"], "bidirectional": True, "min_count": 1}
    model = {"name": name, "embed_dim": z["embed"], "text": text}
    if name == "vse_infty":
        model.update(region_drop=0.2 if augment else 0.0, caption_aug=0.2 if augment else 0.0)
    else:
        model.update(direction="t2i")
        model["text"] = {**text, "mask_word": False}
    recipe = load_recipe(raw={"model": model, "optim": optim or {"name": "adamw", "lr": 5e-4},
                              "loss": {"warmup_epochs": 0, "mask_same_image": False}})
    return recipe, make_tokenizer(recipe, captions=[" ".join(WORDS)])


def make_batches(tok, n, batch, regions, img_dim, seed, lengths=None):
    """``n`` fixed training batches (random features, captions of random words; lengths drawn from ``lengths``)."""
    from itr.data.loader import collate_tokens

    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if lengths is not None:
            words = [int(lengths[i]) - 2 for i in torch.randint(0, len(lengths), (batch,), generator=g)]
        else:
            words = [rng.randint(6, 14) for _ in range(batch)]
        caps = [" ".join(rng.choice(WORDS) for _ in range(max(w, 1))) for w in words]
        ids, lens = collate_tokens([tok.encode(c) for c in caps], tok.pad_id)
        out.append({"feats": torch.randn(batch, regions, img_dim, generator=g), "text_ids": ids, "text_lens": lens,
                    "img_ids": torch.arange(batch), "cap_ids": torch.arange(batch)})
    return out


def accelerator(device):
    """A fresh single-process Accelerator on ``device`` (accelerate keeps one state per process: reset it)."""
    from accelerate.state import AcceleratorState, GradientState

    from itr.distributed import make_accelerator

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return make_accelerator(cpu=device == "cpu")


def train_steps(recipe, tok, batches, img_dim, device, mode, timed=0):
    """The trainer's step (``itr.train.train_step``, clipping, the precision helper) over ``batches`` on ``device``
    from seed-0 weights. Returns losses, first-step gradients, final weights; with ``timed``, samples/s of that
    many more steps after the first (warm-up) ones."""
    from itr.models import build_model
    from itr.optim import make_optimizer
    from itr.precision import Precision
    from itr.step import move_to, train_step

    acc = accelerator(device)
    torch.manual_seed(0)
    model = build_model(recipe, img_dim, tok).to(device)
    opt, impl = make_optimizer(model, recipe.optim)
    model, opt = acc.prepare(model, opt)
    precision = Precision(mode, device)
    batches = [move_to(b, device) for b in batches]
    out = {"losses": [], "grads": None, "skipped": 0, "optimizer": impl}

    def step(b):
        loss = train_step(model, [b], 1, acc, precision, 1)
        precision.unscale_(opt)
        acc.clip_grad_norm_(model.parameters(), 2.0)
        out["skipped"] += int(precision.step(opt))
        return loss

    for b in batches:
        out["losses"].append(float(step(b)))
        if out["grads"] is None:
            out["grads"] = {k: p.grad.detach().float().cpu().clone() for k, p in acc.unwrap_model(model).named_parameters()
                            if p.grad is not None}
        opt.zero_grad(set_to_none=True)
    if timed:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t = _now(device)
        for i in range(timed):
            step(batches[i % len(batches)])
            opt.zero_grad(set_to_none=True)
        out["samples_per_s"] = timed * len(batches[0]["img_ids"]) / (_now(device) - t)
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else float("nan")
    weights = {k: v.detach().float().cpu() for k, v in acc.unwrap_model(model).state_dict().items()
               if v.dtype.is_floating_point}
    out["weights"] = weights
    out["finite_weights"] = all(bool(torch.isfinite(v).all()) for v in weights.values())
    return out


def _now(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def _rel(a, b):
    keys = sorted(a)
    x = torch.cat([a[k].reshape(-1) for k in keys])
    y = torch.cat([b[k].reshape(-1) for k in keys])
    return float((x - y).norm() / x.norm().clamp(min=1e-30))


def compare_runs(ref, got):
    """Relative differences: the worst step's loss, the first step's gradients, the final weights (norms)."""
    loss = max(abs(a - b) / max(abs(a), 1e-30) for a, b in zip(ref["losses"], got["losses"]))
    return {"loss": loss, "gradients": _rel(ref["grads"], got["grads"]), "weights": _rel(ref["weights"], got["weights"])}


def tiny_bert(path, config):
    """A randomly initialised BERT (``config`` over transformers' BertConfig defaults: empty = BERT-base) with a
    word-level vocabulary of the batches' words, saved like a local bert-base-uncased directory."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # the vocabulary positionally: transformers 5 ignores vocab_file= (a 5-token vocabulary, every word [UNK])
    BertTokenizerFast(str(path / "vocab.txt"), do_lower_case=True).save_pretrained(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(BertConfig(**{"vocab_size": 30522, **config})).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- subprocesses and data


def launch(s, args, env=None, cwd=None):
    """Run ``python ARGS`` (in ``cwd``, default the section's folder) inside the section's time left; a failure
    raises with the output's tail."""
    e = dict(os.environ, **(env or {}))
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    left = s.left()
    if left < 5:
        raise Skip("out of time before launching " + " ".join(map(str, args[:4])))
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, errors="replace",
                           env=e, cwd=cwd or s.work, timeout=left)
    except subprocess.TimeoutExpired:
        raise Skip(f"out of time: {' '.join(map(str, args[:6]))} ran past the section's budget") from None
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout[-1500:]}\n{p.stderr[-3000:]}")
    return {"stdout": p.stdout, "stderr": p.stderr, "seconds": time.perf_counter() - t}


def synthetic_data(s, c):
    """Synthetic precomp data (``itr synth``'s generator; ``c``: split sizes, dim, regions) shared by the sections,
    and the overrides that fit it."""
    from itr.data.synthetic import generate

    z = s.work.parent / "synthetic"
    if not (z / "test_caps.txt").is_file():
        generate(z, splits=(("train", c["train"]), ("dev", c["dev"]), ("test", c["test"])), dim=c["dim"],
                 regions=c["regions"], seed=0)
    o = {"data.root": z, "data.num_workers": 0, "data.images_per_shard": 250 if not s.tiny else 20}
    if s.tiny:
        o.update({"data.shuffle_buffer": 200, "model.embed_dim": 32, "model.text.word_dim": 16, "train.batch_size": 16,
                  "eval.batch_size": 64, "train.log_every": 2})
    return {"root": z, "overrides": [f"{k}={v}" for k, v in o.items()]}


# ----------------------------------------------------------------------------- SCAN at scale


def scan_model(dim):
    from scan_allpairs import build_model

    return build_model(dim)


def scan_inputs(n_img, n_cap, regions, dim, device):
    """L2-normalised random regions and words on ``device`` (a random SCAN's embeddings), real caption lengths."""
    g = torch.Generator(device).manual_seed(0)
    lengths = caption_lengths()
    if lengths is None:
        lens = torch.randint(8, 17, (n_cap,), generator=torch.Generator().manual_seed(0))
    else:
        lens = lengths[torch.randint(0, len(lengths), (n_cap,), generator=torch.Generator().manual_seed(0))]
    L = int(lens.max())
    img = torch.nn.functional.normalize(torch.randn(n_img, regions, dim, generator=g, device=device), dim=-1)
    words = torch.nn.functional.normalize(torch.randn(n_cap, L, dim, generator=g, device=device), dim=-1)
    lens = lens.to(device)
    words = words * (torch.arange(L, device=device)[None, :, None] < lens[:, None, None])
    return img, {"words": words, "lens": lens}, lens


@torch.no_grad()
def reference_t2i(img, words, lens, shard=128):
    """kuanghuei/SCAN's shard_xattn_t2i (128 x 128 tiles, a Python loop over each tile's captions) on any device."""
    import numpy as np
    from scan_allpairs import xattn_score_t2i

    out = np.zeros((img.shape[0], words.shape[0]), dtype=np.float32)
    for i0 in range(0, img.shape[0], shard):
        for j0 in range(0, words.shape[0], shard):
            out[i0:i0 + shard, j0:j0 + shard] = xattn_score_t2i(
                img[i0:i0 + shard], words[j0:j0 + shard], lens[j0:j0 + shard], 9.0, 6.0).cpu().numpy()
    return out
