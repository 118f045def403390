"""The image x caption similarity matrix, computed in tiles, with the tiles divided among ranks.

The matrix is cut into a fixed grid of ``chunk x chunk`` tiles, dealt round robin to the
ranks. Each tile is one batched call of the model's ``score`` over all of its pairs, so peak
memory beyond the result is one tile (plus what ``score`` needs for it: the large part for
cross-attention models). Rank 0 gathers the tiles, then computes ranks and metrics.

Because the grid does not depend on the number of ranks, every score is computed by the same
call on the same inputs whatever the world size: results are bitwise identical for 1 or N
ranks. A different tile size changes the shapes of the batched operations, which can change
the last bits of a score (BLAS blocking); scores then agree to ~1e-7.
Every rank makes the same number of ``score`` calls (ZeRO-3 gathers parameters inside them).
"""
import numpy as np
import torch
import torch.distributed as dist

from itr.distributed import comm_device


def rows(emb, lo, hi, device="cpu"):
    """Rows [lo, hi) of an embedding (a tensor, or a dict of tensors for token-level models)."""
    if isinstance(emb, dict):
        return {k: v[lo:hi].to(device) for k, v in emb.items()}
    return emb[lo:hi].to(device)


def num_rows(emb):
    return next(iter(emb.values())).shape[0] if isinstance(emb, dict) else emb.shape[0]


def tile_grid(n, m, chunk):
    return [(i, min(n, i + chunk), j, min(m, j + chunk)) for i in range(0, n, chunk) for j in range(0, m, chunk)]


@torch.no_grad()
def similarity_matrix(score_fn, img_emb, cap_emb, chunk=1024, device="cpu", progress=False, rank=0, world=1):
    """(n_images, n_captions) float32 scores on rank 0 (None on the other ranks)."""
    n, m = num_rows(img_emb), num_rows(cap_emb)
    grid = tile_grid(n, m, chunk)
    mine = grid[rank::world]
    calls = -(-len(grid) // world)
    from itr.progress import bar

    blocks = []
    for t in bar(range(calls), desc="similarity tiles", enabled=progress and calls >= 4, leave=False):
        if t < len(mine):
            i0, i1, j0, j1 = mine[t]
            blocks.append(score_fn(rows(img_emb, i0, i1, device), rows(cap_emb, j0, j1, device)).float().cpu())
        else:  # keep step with ranks that have one more tile
            score_fn(rows(img_emb, 0, 1, device), rows(cap_emb, 0, 1, device))
    if world > 1:
        blocks = _gather_tiles(blocks, grid, rank, world)
        if rank != 0:
            return None
    out = np.empty((n, m), dtype=np.float32)
    for (i0, i1, j0, j1), b in zip(_dealt_order(grid, world), blocks):
        out[i0:i1, j0:j1] = b.numpy()
    return out


def _dealt_order(grid, world):
    """Tiles in the order rank 0 holds them after the gather: rank 0's, then rank 1's, ..."""
    return [t for r in range(world) for t in grid[r::world]]


def _gather_tiles(blocks, grid, rank, world):
    sizes = [sum((i1 - i0) * (j1 - j0) for i0, i1, j0, j1 in grid[r::world]) for r in range(world)]
    flat = torch.zeros(max(sizes), dtype=torch.float32)
    if blocks:
        mine = torch.cat([b.reshape(-1) for b in blocks])
        flat[: mine.numel()] = mine
    flat = flat.to(comm_device())  # NCCL gathers GPU tensors only
    parts = [torch.empty_like(flat) for _ in range(world)] if rank == 0 else None
    dist.gather(flat, parts, dst=0)
    if rank != 0:
        return None
    parts = [p.cpu() for p in parts]
    out = []
    for r, part in enumerate(parts):
        offset = 0
        for i0, i1, j0, j1 in grid[r::world]:
            k = (i1 - i0) * (j1 - j0)
            out.append(part[offset:offset + k].reshape(i1 - i0, j1 - j0))
            offset += k
    return out
