"""Embed a split across ranks.

Items are cut into a fixed grid of batches (captions sorted by token length first, for less
padding) and the batches are dealt round robin to the ranks, then all-gathered back into item
order. The grid does not depend on the number of ranks, so every embedding comes from the same
batch, and is bitwise the same, on 1 or N ranks. Every rank runs the same number of forward
passes (ZeRO-3 gathers parameters in each of them).
"""
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist

from itr.data.loader import collate_tokens
from itr.distributed import global_max_shape, pad_cat, pad_to
from itr.eval.spill import DiskRows, should_spill
from itr.models.base import check_region_lens


class Spill(NamedTuple):
    """Where and above what size plain embeddings go to disk (``eval.spill_gib`` / ``eval.spill_dir``)."""
    gib: float
    folder: Optional[str] = None


def _float(out):
    """Floating embeddings to fp32 (whatever the autocast dtype); integer ones (lengths) as they are."""
    if isinstance(out, dict):
        return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}
    return out.float()


def _progress(total, desc, enabled):
    from itr.progress import bar

    return bar(total=total, desc=desc, unit="batch", enabled=enabled, leave=False)


def _dealt(n, batch_size, rank, world):
    """(all batches as [lo, hi) of the grid, this rank's batch indices, forward passes per rank)."""
    grid = [(lo, min(n, lo + batch_size)) for lo in range(0, n, batch_size)]
    return grid, list(range(rank, len(grid), world)), -(-len(grid) // world)


def _as_dict(out):
    return out if isinstance(out, dict) else {"": out}


def _from_dict(d):
    return d[""] if set(d) == {""} else d


def _run(embed_one, n, batch_size, rank, world, desc, progress, spill=None, where=None):
    """Embed grid batches ``embed_one(lo, hi)`` dealt to this rank; return all n rows on every rank.

    An embedding is a tensor or a dict of tensors, batch first; token-level ones (cross-attention
    models) differ in length between batches and are zero-padded to the longest. Plain (n, d) embeddings
    larger than ``spill.gib`` go into a ``DiskRows`` file instead, a round of batches at a time, row
    ``where(lo, hi)[i]`` for the i-th row of grid batch [lo, hi) (default: the identity)."""
    grid, mine, calls = _dealt(n, batch_size, rank, world)
    outs, disk = [], None
    with _progress(calls, desc, progress) as bar:
        for t in range(calls):
            if t < len(mine):
                out = _as_dict(embed_one(*grid[mine[t]]))
            else:  # keep step with ranks that have one more batch; its empty slice keeps the shape
                out = {k: v[:0] for k, v in _as_dict(embed_one(0, 1)).items()}
            if t == 0 and _spills(out, n, spill):
                disk = DiskRows(n, out[""].shape[1], spill.folder)
                if progress:
                    print(f"[itr] {desc}: {n} x {disk.shape[1]} embeddings kept in a file in {disk.folder} "
                          f"(eval.spill_gib={spill.gib:g}), read tile by tile", flush=True)
            if disk is not None:
                _spill_round(disk, out[""], grid, t, rank, world, where or (lambda lo, hi: np.arange(lo, hi)))
            else:
                outs.append(out)
            bar.update(1)
    if disk is not None:
        return disk
    local = {k: pad_cat([o[k] for o in outs]) for k in outs[0]}
    if world == 1:
        return _from_dict({k: v.cpu() for k, v in local.items()})
    return _from_dict({k: _all_gather_dealt(v, grid, n, rank, world) for k, v in local.items()})


def _spills(out, n, spill):
    return spill is not None and set(out) == {""} and out[""].dim() == 2 and should_spill(n, out[""].shape[1],
                                                                                          spill.gib)


def _spill_round(disk, local, grid, t, rank, world, where):
    """Round ``t``'s batches of every rank (rank r's is grid batch r + t world) written into ``disk``."""
    if world == 1:
        parts = [local]
    else:
        size = max(hi - lo for lo, hi in grid)
        buf = torch.zeros((size, local.shape[1]), dtype=local.dtype, device=local.device)
        buf[: local.shape[0]] = local
        parts = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(parts, buf)
    for r, part in enumerate(parts):
        g = r + t * world
        if g < len(grid):
            lo, hi = grid[g]
            disk.write(where(lo, hi), part[: hi - lo])


def _all_gather_dealt(local, grid, n, rank, world):
    size = max(sum(hi - lo for lo, hi in grid[r::world]) for r in range(world))
    shape = global_max_shape(local)
    buf = torch.zeros((size, *shape[1:]), dtype=local.dtype, device=local.device)
    buf[: local.shape[0]] = pad_to(local, shape)
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf)
    out = torch.empty((n, *shape[1:]), dtype=local.dtype)
    for r, part in enumerate(parts):
        offset = 0
        for lo, hi in grid[r::world]:
            out[lo:hi] = part[offset:offset + hi - lo].cpu()
            offset += hi - lo
    return out


@torch.no_grad()
def embed_images(model, split, batch_size=256, device="cpu", rank=0, world=1, progress=False, spill=None):
    def one(lo, hi):
        inputs = split.image_inputs(lo, hi)
        check_region_lens(model, inputs)
        return _float(model.embed_images({k: v.to(device) for k, v in inputs.items()}))

    return _run(one, split.num_images, batch_size, rank, world, "embed images", progress, spill)


@torch.no_grad()
def embed_captions(model, captions, tokenizer, batch_size=256, device="cpu", rank=0, world=1, progress=False,
                   spill=None):
    tokens = [tokenizer.encode(c) for c in captions]
    order = sorted(range(len(tokens)), key=lambda i: (len(tokens[i]), i))

    def one(lo, hi):
        ids, lens = collate_tokens([tokens[i] for i in order[lo:hi]], tokenizer.pad_id)
        return _float(model.embed_captions({"text_ids": ids.to(device), "text_lens": lens.to(device)}))

    order_np = np.asarray(order, dtype=np.int64)
    emb = _run(one, len(tokens), batch_size, rank, world, "embed captions", progress, spill,
               where=lambda lo, hi: order_np[lo:hi])
    if isinstance(emb, DiskRows):  # written in caption order already
        return emb
    sorted_emb = _as_dict(emb)
    out = {}
    for k, v in sorted_emb.items():
        out[k] = torch.empty_like(v)
        out[k][torch.as_tensor(order)] = v
    return _from_dict(out)


def embed_split(model, split, tokenizer, batch_size=256, device="cpu", rank=0, world=1, progress=False, spill=None):
    """(images, captions) embedded, every row on every rank: tensors (or dicts of them), or ``DiskRows`` files
    for plain embeddings over ``spill.gib`` (``itr.eval.spill``)."""
    was_training = model.training
    model.eval()
    try:
        img = embed_images(model, split, batch_size, device, rank, world, progress, spill)
        cap = embed_captions(model, split.captions, tokenizer, batch_size, device, rank, world, progress, spill)
    finally:
        model.train(was_training)
    return img, cap
