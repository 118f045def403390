"""One training step of a SelfAlign model with the real trainer code (``itr.train.train_step``) on a
fixed global batch, split over the ranks and accumulation steps this process was started with;
rank 0 saves the loss and every parameter's gradient. Used by tests/test_selfalign.py under 1 and
2 processes: all must equal the whole batch in one process, the prototypes' gradient included
(their Sinkhorn codes are computed on the global batch).

    python selfalign_step.py OUT.pt GRAD_ACCUM {vsrn|camera} [global_negatives]

(or ``step(...)`` in-process, for one process).

The model runs in eval mode: BatchNorm batch statistics and dropout masks depend on how a batch is
split by design; everything else (the losses and the batch-level prototypes) must not.
"""
import sys
import tempfile
from pathlib import Path

import torch

from itr.config import load_recipe
from itr.data.loader import collate_tokens
from itr.distributed import all_reduce_sum, make_accelerator
from itr.models import build_model, make_tokenizer
from itr.precision import Precision
from itr.train import train_step

B, R, D = 8, 4, 12
CAPS = ["a red dog near a cat", "there is a bike", "a photo of a blue car and a tree", "a dog",
        "a cat and a kite", "an image showing a bus", "a green tree", "a boat near a bridge"]


def tiny_bert(root):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w for c in CAPS for w in c.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(root / "vocab.txt"), do_lower_case=True).save_pretrained(root)
    torch.manual_seed(123)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(root)
    return root


def step(accum, kind="vsrn", global_negatives="true"):
    """{"loss", "grads", "world"} of one step (on every rank)."""
    accum = int(accum)
    common = {"embed_dim": 16, "prototypes": 24, "negatives": 7}
    if kind == "vsrn":
        model = {"name": "selfalign_vsrn", **common, "text": {"name": "gru", "word_dim": 8, "min_count": 1},
                 "caption_hidden": 8, "caption_word_dim": 6}
    else:
        bert = tiny_bert(Path(tempfile.mkdtemp()))
        model = {"name": "selfalign_camera", **common, "heads": 2, "views": 3,
                 "text": {"name": "hf", "path": str(bert), "freeze": False}}
    recipe = load_recipe(raw={"model": model, "data": {"max_words": 12},
                              "loss": {"global_negatives": global_negatives == "true"}})
    tok = make_tokenizer(recipe, captions=CAPS)
    torch.manual_seed(0)
    model = build_model(recipe, D, tok).eval()
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(B, R, D, generator=g)
    xy = torch.rand(B, R, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + 0.1 + 0.4 * torch.rand(B, R, 2, generator=g)], dim=-1)
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
        micro.append({"feats": feats[idx], "boxes": boxes[idx], "text_ids": ids, "text_lens": lens,
                      "img_ids": img_ids[idx]})
    loss = train_step(model, micro, 1, acc, Precision("no", "cpu"), world)  # epoch 1: prototypes not frozen
    total = all_reduce_sum(loss.reshape(1)).item()
    grads = {k: p.grad.detach().clone() for k, p in acc.unwrap_model(model).named_parameters() if p.grad is not None}
    return {"loss": total, "grads": grads, "world": world, "main": acc.is_main_process}


def main(out, accum, kind="vsrn", global_negatives="true"):
    r = step(accum, kind, global_negatives)
    if r.pop("main"):
        torch.save(r, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
