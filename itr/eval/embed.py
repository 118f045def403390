"""Embed a split: every rank embeds a contiguous slice of the images and captions, then all gather.

Captions are batched in length order (less padding) and returned in caption order.
"""
import torch

from itr.data.loader import collate_tokens
from itr.distributed import gather_rows, shard_range


def _progress(total, desc, enabled):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not enabled, leave=False)


def _local_batches(n, rank, world, batch_size):
    """This rank's [lo, hi) slices of n items, padded with empty slices so that every rank
    runs the same number of forward passes (ZeRO-3 gathers parameters in each of them)."""
    lo, hi = shard_range(n, rank, world)
    steps = -(-(-(-n // world)) // batch_size)  # ceil(ceil(n / world) / batch_size)
    return [(min(hi, lo + i * batch_size), min(hi, lo + (i + 1) * batch_size)) for i in range(steps)], hi - lo


@torch.no_grad()
def embed_images(model, split, batch_size=256, device="cpu", rank=0, world=1, progress=False):
    n = split.num_images
    slices, count = _local_batches(n, rank, world, batch_size)
    outs = []
    with _progress(count, "embed images", progress) as bar:
        for a, b in slices:
            inputs = split.image_inputs(a, b) if b > a else split.image_inputs(0, 1)  # empty slices still run
            emb = model.embed_images({k: v.to(device) for k, v in inputs.items()}).float()
            outs.append(emb[: b - a])
            bar.update(b - a)
    return gather_rows(torch.cat(outs), n, world).cpu()


@torch.no_grad()
def embed_captions(model, captions, tokenizer, batch_size=256, device="cpu", rank=0, world=1, progress=False):
    m = len(captions)
    lo, _ = shard_range(m, rank, world)
    slices, count = _local_batches(m, rank, world, batch_size)
    tokens = [tokenizer.encode(c) for c in captions[lo:lo + count]] or [tokenizer.encode(captions[0])]
    order = sorted(range(count), key=lambda i: len(tokens[i]))
    out = None
    with _progress(count, "embed captions", progress) as bar:
        for a, b in slices:
            idx = order[a - lo:b - lo] or [0]
            ids, lens = collate_tokens([tokens[i] for i in idx], tokenizer.pad_id)
            emb = model.embed_captions({"text_ids": ids.to(device), "text_lens": lens.to(device)}).float()
            if out is None:
                out = torch.empty((count, *emb.shape[1:]), device=device)
            if b > a:
                out[torch.as_tensor(idx, device=device)] = emb
            bar.update(b - a)
    return gather_rows(out, m, world).cpu()


def embed_split(model, split, tokenizer, batch_size=256, device="cpu", rank=0, world=1, progress=False):
    was_training = model.training
    model.eval()
    try:
        img = embed_images(model, split, batch_size, device, rank, world, progress)
        cap = embed_captions(model, split.captions, tokenizer, batch_size, device, rank, world, progress)
    finally:
        model.train(was_training)
    return img, cap
