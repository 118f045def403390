"""One training step of HREM (the real ``itr.train.train_step``) on a fixed global batch, split over the
ranks and accumulation steps this process was started with; rank 0 saves the total loss and the gradients.
Used by tests/test_hrem.py in-process (1 rank) and under ``accelerate launch`` (2 ranks).

    python hrem_step.py OUT.pt GRAD_ACCUM LOSS(trip|vse)

The instance-level interaction (its transformer with dropout 0.1, the relation MLPs, the triplet loss's
sampled negatives) is live, after its warm-up. The encoders run in eval mode: their BatchNorm batch
statistics and dropout are per micro-batch by nature, and are not what this checks.
"""
import sys

import torch

from itr.config import load_recipe
from itr.data.loader import collate_tokens
from itr.distributed import all_reduce_sum, make_accelerator
from itr.models import build_model, make_tokenizer
from itr.precision import Precision
from itr.train import train_step

B = 8
CAPS = ["a red dog near a cat", "there is a bike", "a photo of a blue car and a tree", "a dog",
        "a cat and a kite", "an image showing a bus", "a green tree", "a boat near a bridge"]


def recipe(loss="trip"):
    return load_recipe(raw={"model": {"name": "hrem", "embed_dim": 16, "nhead": 4, "topk": 3, "relation_words": 12,
                                      "interaction_warmup_epochs": 0, "region_drop": 0.0, "caption_aug": 0.0,
                                      "base_loss": loss, "gnn_loss": loss, "trip_cutoff": 1.99,
                                      "text": {"name": "gru_words", "word_dim": 8, "min_count": 1}},
                            "loss": {"warmup_epochs": 1}})


def main(out, accum, loss="trip", acc=None):
    accum = int(accum)
    r = recipe(loss)
    tok = make_tokenizer(r, captions=CAPS)
    torch.manual_seed(0)
    model = build_model(r, 12, tok)
    model.train()
    model.img_fc.eval(), model.img_rel.eval(), model.txt_enc.eval(), model.txt_rel.eval()
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(B, 4, 12, generator=g)
    img_ids = torch.tensor([0, 1, 2, 0, 3, 4, 2, 5])  # pairs 0/3 and 2/6 show the same image, on different ranks
    acc = acc or make_accelerator(grad_accum=accum)
    world, rank = acc.num_processes, acc.process_index
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = acc.prepare(model, opt)
    n = B // world
    lo = rank * n
    micro = []
    for a in range(accum):
        idx = list(range(lo + a * n // accum, lo + (a + 1) * n // accum))
        ids, lens = collate_tokens([tok.encode(CAPS[i]) for i in idx], tok.pad_id)
        micro.append({"feats": feats[idx], "text_ids": ids, "text_lens": lens, "img_ids": img_ids[idx]})
    # A different global RNG state on every rank and for every split: the instance level must not depend on it
    # (its random draws are seeded by the batch), or the gradients would differ.
    torch.manual_seed(1000 + 10 * rank + accum)
    loss_value = train_step(model, micro, 1, acc, Precision("no", "cpu"), world)
    total = all_reduce_sum(loss_value.reshape(1)).item()
    grads = {k: p.grad.detach().clone() for k, p in acc.unwrap_model(model).named_parameters() if p.grad is not None}
    result = {"loss": total, "grads": grads, "world": world}
    if acc.is_main_process and out:
        torch.save(result, out)
    return result


if __name__ == "__main__":
    main(*sys.argv[1:])
