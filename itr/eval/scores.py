"""The image x caption similarity matrix, computed tile by tile.

Peak memory beyond the (n_images, n_captions) float32 result is one tile of
``chunk x chunk`` scores (plus whatever the model's ``score`` needs for a tile, which
for cross-attention models is the large part).
"""
import numpy as np
import torch


@torch.no_grad()
def similarity_matrix(score_fn, img_emb, cap_emb, chunk=1024, device="cpu", progress=False):
    n, m = img_emb.shape[0], cap_emb.shape[0]
    out = np.empty((n, m), dtype=np.float32)
    tiles = [(i, j) for i in range(0, n, chunk) for j in range(0, m, chunk)]
    from tqdm import tqdm

    for i, j in tqdm(tiles, desc="similarity tiles", disable=not progress or len(tiles) < 4, leave=False):
        s = score_fn(img_emb[i:i + chunk].to(device), cap_emb[j:j + chunk].to(device))
        out[i:i + chunk, j:j + chunk] = s.float().cpu().numpy()
    return out
