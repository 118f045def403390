"""Embed a split: every rank embeds a contiguous slice of the images and captions, then all gather.

Captions are batched in length order (less padding) and returned in caption order.
"""
import numpy as np
import torch

from itr.data.loader import collate_tokens
from itr.distributed import gather_rows, shard_range


def _progress(total, desc, enabled):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not enabled, leave=False)


@torch.no_grad()
def embed_images(model, images, batch_size=256, device="cpu", rank=0, world=1, progress=False):
    n = images.shape[0]
    lo, hi = shard_range(n, rank, world)
    outs = []
    with _progress(hi - lo, "embed images", progress) as bar:
        for i in range(lo, hi, batch_size):
            feats = torch.from_numpy(np.array(images[i:min(hi, i + batch_size)], dtype=np.float32)).to(device)
            outs.append(model.embed_images(feats).float())
            bar.update(feats.shape[0])
    local = torch.cat(outs) if outs else torch.zeros(0, device=device)
    if not outs:  # an empty slice still needs the embedding shape for the gather
        local = model.embed_images(torch.zeros((1, *images.shape[1:]), device=device)).float()[:0]
    return gather_rows(local, n, world).cpu()


@torch.no_grad()
def embed_captions(model, captions, tokenizer, batch_size=256, device="cpu", rank=0, world=1, progress=False):
    m = len(captions)
    lo, hi = shard_range(m, rank, world)
    tokens = [tokenizer.encode(c) for c in captions[lo:hi]]
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
    out = None
    with _progress(len(tokens), "embed captions", progress) as bar:
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            ids, lens = collate_tokens([tokens[i] for i in idx], tokenizer.pad_id)
            emb = model.embed_captions(ids.to(device), lens.to(device)).float()
            if out is None:
                out = torch.empty((len(tokens), *emb.shape[1:]), device=device)
            out[torch.as_tensor(idx, device=device)] = emb
            bar.update(len(idx))
    if out is None:
        ids, lens = collate_tokens([tokenizer.encode("a")], tokenizer.pad_id)
        out = model.embed_captions(ids.to(device), lens.to(device)).float()[:0]
    return gather_rows(out, m, world).cpu()


def embed_split(model, split, tokenizer, batch_size=256, device="cpu", rank=0, world=1, progress=False):
    was_training = model.training
    model.eval()
    try:
        img = embed_images(model, split.images, batch_size, device, rank, world, progress)
        cap = embed_captions(model, split.captions, tokenizer, batch_size, device, rank, world, progress)
    finally:
        model.train(was_training)
    return img, cap
