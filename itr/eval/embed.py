"""Embed a split across ranks.

Items are cut into a fixed grid of batches (captions sorted by token length first, for less
padding) and the batches are dealt round robin to the ranks, then all-gathered back into item
order. The grid does not depend on the number of ranks, so every embedding comes from the same
batch, and is bitwise the same, on 1 or N ranks. Every rank runs the same number of forward
passes (ZeRO-3 gathers parameters in each of them).
"""
import torch
import torch.distributed as dist

from itr.data.loader import collate_tokens
from itr.distributed import global_max_shape, pad_cat, pad_to
from itr.models.base import check_region_lens


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


def _run(embed_one, n, batch_size, rank, world, desc, progress):
    """Embed grid batches ``embed_one(lo, hi)`` dealt to this rank; return all n rows on every rank.

    An embedding is a tensor or a dict of tensors, batch first; token-level ones (cross-attention
    models) differ in length between batches and are zero-padded to the longest."""
    grid, mine, calls = _dealt(n, batch_size, rank, world)
    outs = []
    with _progress(calls, desc, progress) as bar:
        for t in range(calls):
            if t < len(mine):
                outs.append(_as_dict(embed_one(*grid[mine[t]])))
            else:  # keep step with ranks that have one more batch; its empty slice keeps the shape
                outs.append({k: v[:0] for k, v in _as_dict(embed_one(0, 1)).items()})
            bar.update(1)
    local = {k: pad_cat([o[k] for o in outs]) for k in outs[0]}
    if world == 1:
        return _from_dict({k: v.cpu() for k, v in local.items()})
    return _from_dict({k: _all_gather_dealt(v, grid, n, rank, world) for k, v in local.items()})


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
def embed_images(model, split, batch_size=256, device="cpu", rank=0, world=1, progress=False):
    def one(lo, hi):
        inputs = split.image_inputs(lo, hi)
        check_region_lens(model, inputs)
        return _float(model.embed_images({k: v.to(device) for k, v in inputs.items()}))

    return _run(one, split.num_images, batch_size, rank, world, "embed images", progress)


@torch.no_grad()
def embed_captions(model, captions, tokenizer, batch_size=256, device="cpu", rank=0, world=1, progress=False):
    tokens = [tokenizer.encode(c) for c in captions]
    order = sorted(range(len(tokens)), key=lambda i: (len(tokens[i]), i))

    def one(lo, hi):
        ids, lens = collate_tokens([tokens[i] for i in order[lo:hi]], tokenizer.pad_id)
        return _float(model.embed_captions({"text_ids": ids.to(device), "text_lens": lens.to(device)}))

    sorted_emb = _as_dict(_run(one, len(tokens), batch_size, rank, world, "embed captions", progress))
    out = {}
    for k, v in sorted_emb.items():
        out[k] = torch.empty_like(v)
        out[k][torch.as_tensor(order)] = v
    return _from_dict(out)


def embed_split(model, split, tokenizer, batch_size=256, device="cpu", rank=0, world=1, progress=False):
    was_training = model.training
    model.eval()
    try:
        img = embed_images(model, split, batch_size, device, rank, world, progress)
        cap = embed_captions(model, split.captions, tokenizer, batch_size, device, rank, world, progress)
    finally:
        model.train(was_training)
    return img, cap
