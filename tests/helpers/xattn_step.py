"""One training step of a cross-attention model (SCAN, TERAN) with the real ``itr.train.train_step`` on a
fixed global batch, split over the ranks and accumulation steps this process was started with; rank 0
saves the total loss and the gradients. Used by tests/test_scan.py and tests/test_teran.py in-process
(1 rank, grad_accum 1 / 2) and under ``accelerate launch`` (2 ranks).

    python xattn_step.py OUT.pt GRAD_ACCUM scan_t2i|scan_i2t|teran [BERT_DIR]

Captions of different lengths land in different micro-batches / ranks, so the word features are
zero-padded differently than in the whole batch: the step must not depend on it. Dropout is off
(its masks depend on how the batch is split, which is not what this checks).
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
CAPS = ["a red dog near a cat", "there is a bike", "a photo of a blue car and a tree near a house", "a dog",
        "a cat and a kite", "an image showing a bus", "a green tree", "a boat near a bridge"]


def recipe(which, bert=None):
    if which == "teran":
        model = {"name": "teran", "embed_dim": 16, "image_layers": 1, "layers": 1, "heads": 2, "ff_dim": 32,
                 "dropout": 0.0, "text_layers": 0, "drop_last_word": False, "text": {"name": "hf_words", "path": str(bert)}}
    else:
        model = {"name": "scan", "embed_dim": 16, "direction": which.split("_")[1],
                 "lambda_softmax": 9.0 if which == "scan_t2i" else 4.0, "lambda_lse": 6.0 if which == "scan_t2i" else 5.0,
                 "text": {"name": "gru_words", "word_dim": 8, "min_count": 1, "mask_word": False}}
    return load_recipe(raw={"model": model, "loss": {"mask_same_image": True}})


def main(out, accum, which="scan_t2i", bert=None, acc=None):
    accum = int(accum)
    r = recipe(which, bert)
    tok = make_tokenizer(r, captions=CAPS)
    torch.manual_seed(0)
    model = build_model(r, 12, tok)
    model.train()
    if which == "teran":
        model.txt_enc.backbone.eval()  # BERT's own dropout 0.1 off too
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(B, 4, 12, generator=g)
    boxes = torch.rand(B, 4, 4, generator=g)
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
        micro.append({"feats": feats[idx], "boxes": boxes[idx], "text_ids": ids, "text_lens": lens,
                      "img_ids": img_ids[idx]})
    loss_value = train_step(model, micro, 0, acc, Precision("no", "cpu"), world)
    total = all_reduce_sum(loss_value.reshape(1)).item()
    grads = {k: p.grad.detach().clone() for k, p in acc.unwrap_model(model).named_parameters() if p.grad is not None}
    result = {"loss": total, "grads": grads, "world": world}
    if acc.is_main_process and out:
        torch.save(result, out)
    return result


if __name__ == "__main__":
    main(*sys.argv[1:])
