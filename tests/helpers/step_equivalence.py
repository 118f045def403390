"""One training step of the real trainer code on a fixed global batch, split over the ranks
and accumulation steps this process was started with; rank 0 saves the total loss and the
gradients. Used by tests/test_global_batch.py under 1 and 2 processes.

    python step_equivalence.py OUT.pt GRAD_ACCUM [global_negatives] [head]

With ``head``, the model has a learnable batch-level module (a linear map applied to the
gathered image embeddings inside ``batch_loss``, as HREM's instance interaction is), whose
gradient must come out the same too.
"""
import sys

import torch

from itr.config import load_recipe
from itr.data.loader import collate_tokens
from itr.distributed import all_reduce_sum, make_accelerator
from itr.models import build_model, make_tokenizer, model_config
from itr.models.vsepp import VSEPP
from itr.precision import Precision
from itr.train import train_step

B = 8
CAPS = ["a red dog near a cat", "there is a bike", "a photo of a blue car and a tree", "a dog",
        "a cat and a kite", "an image showing a bus", "a green tree", "a boat near a bridge"]


class WithBatchHead(VSEPP):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.head = torch.nn.Linear(16, 16)

    def batch_loss(self, emb, img_ids, epoch):
        img = torch.nn.functional.normalize(self.head(emb["img"]), dim=1)
        return self.criterion({"img": img, "cap": emb["cap"]}, {"img_ids": img_ids}, epoch)


def main(out, accum, global_negatives="true", head="no"):
    accum = int(accum)
    recipe = load_recipe(raw={"model": {"name": "vsepp", "embed_dim": 16,
                                        "text": {"name": "gru", "word_dim": 8, "min_count": 1}},
                              "loss": {"global_negatives": global_negatives == "true"}})
    tok = make_tokenizer(recipe, captions=CAPS)
    torch.manual_seed(0)
    model = build_model(recipe, 12, tok) if head == "no" else WithBatchHead(
        model_config(recipe)[1], 12, tok, recipe.loss)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(B, 3, 12, generator=g)
    img_ids = torch.tensor([0, 1, 2, 0, 3, 4, 2, 5])  # pairs 0/3 and 2/6 show the same image, on different ranks
    acc = make_accelerator(grad_accum=accum)
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
    loss = train_step(model, micro, 0, acc, Precision("no", "cpu"), world)
    total = all_reduce_sum(loss.reshape(1)).item()
    grads = {k: p.grad.detach().clone() for k, p in acc.unwrap_model(model).named_parameters()}
    if acc.is_main_process:
        torch.save({"loss": total, "grads": grads, "world": world}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
