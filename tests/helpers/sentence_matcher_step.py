"""One training step of the sentence matcher (real trainer code, ``itr.train.train_step``) on a fixed
global batch, split over the ranks and accumulation steps this process was started with; rank 0
saves the total loss and the gradients. Used by tests/test_sentence_matcher.py under 1 and 2 processes.

    python sentence_matcher_step.py OUT.pt GRAD_ACCUM TINY_BERT_DIR

The model is in eval mode (no dropout), so that every split computes the same function.
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
CAPS = ["a red dog near a cat", "there is a bike", "a photo of a blue car", "a dog",
        "a cat and a kite", "a bus", "a green tree", "a boat near a bridge"]


def recipe(tiny_bert):
    return load_recipe(raw={
        "model": {"name": "sentence_matcher", "embed_dim": 16, "mlp_dim": 24,
                  "image": {"name": "xmatching_resnet", "depths": [1, 1], "hidden_sizes": [8, 16], "embedding_size": 8,
                            "layer_type": "basic", "finetune": True, "freeze_stem": True, "frozen_bn": True},
                  "text": {"name": "hf", "path": str(tiny_bert), "pool": "cls"}},
        "loss": {"margin": 0.5}})


def main(out, accum, tiny_bert):
    accum = int(accum)
    r = recipe(tiny_bert)
    tok = make_tokenizer(r)
    torch.manual_seed(0)
    model = build_model(r, 0, tok).eval()
    g = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (B, 3, 32, 32), generator=g, dtype=torch.uint8)
    # partners (i, i + 4): 1/5 show the same image; 0 and 2 are on rank 0, their partners 4 and 6 on rank 1
    img_ids = torch.tensor([0, 1, 2, 3, 4, 1, 6, 7])
    acc = make_accelerator(grad_accum=accum)
    world, rank = acc.num_processes, acc.process_index
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    model, opt = acc.prepare(model, opt)
    n = B // world
    lo = rank * n
    micro = []
    for a in range(accum):
        idx = list(range(lo + a * n // accum, lo + (a + 1) * n // accum))
        ids, lens = collate_tokens([tok.encode(CAPS[i]) for i in idx], tok.pad_id)
        micro.append({"pixels": pixels[idx], "text_ids": ids, "text_lens": lens, "img_ids": img_ids[idx]})
    loss = train_step(model, micro, 0, acc, Precision("no", "cpu"), world)
    total = all_reduce_sum(loss.reshape(1)).item()
    grads = {k: p.grad.detach().clone() for k, p in acc.unwrap_model(model).named_parameters() if p.grad is not None}
    if acc.is_main_process:
        torch.save({"loss": total, "grads": grads, "world": world}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
