"""One training step of the real trainer (``itr.train.train_step``) on a fixed global batch, split
over the ranks this process was started with and then over accumulation steps: the one script
behind every model's multi-rank / accumulation equivalence test (``launch_steps`` in
tests/conftest.py runs it in the test process for 1 rank, under ``accelerate launch`` for more).

    python step.py OUT.pt '{"runs": [{"model": "scan_t2i", "accum": 2}, ...], "bert": DIR}'

Each run builds its model afresh (``MODELS[run["model"]]``, seeded), takes this rank's share of
the same 8 pairs, and computes one step; rank 0 saves one {"loss", "grads", "world"} per run.
Several runs share one launch because starting processes is most of the cost.

Splitting must change neither the loss nor any gradient. What may depend on the split by nature
is switched off per model (``eval``: dropout, BatchNorm batch statistics). The global RNG is
seeded differently on every rank and for every split: a step must not depend on it.
"""
import json
import sys
from pathlib import Path

import torch

from itr.config import load_recipe
from itr.data.loader import collate_tokens
from itr.distributed import all_reduce_sum, make_accelerator
from itr.models import build_model, make_tokenizer, model_config
from itr.models.vsepp import VSEPP
from itr.precision import Precision
from itr.train import train_step

ROOT = Path(__file__).resolve().parents[2]
B, R, D = 8, 4, 12
# Lengths differ, so micro-batches and ranks pad the words differently than the whole batch does.
CAPS = ["a red dog near a cat", "there is a bike", "a photo of a blue car and a tree near a house", "a dog",
        "a cat and a kite", "an image showing a bus", "a green tree", "a boat near a bridge"]
SAME_IMAGE = [0, 1, 2, 0, 3, 4, 2, 5]  # pairs 0/3 and 2/6 show the same image, on different ranks
GRU = {"name": "gru", "word_dim": 8, "min_count": 1}
REGIONS = [2, 4, 1, 3, 3, 1, 2, 2]  # "regions": per-pair region counts (of R); 2 ranks: padded to 4 and 3
GRU_WORDS = {**GRU, "name": "gru_words"}


class WithBatchHead(VSEPP):
    """VSE++ with a learnable module inside ``batch_loss`` (a linear map of the gathered image
    embeddings, as HREM's instance interaction is): its gradient must come out whole too."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.head = torch.nn.Linear(16, 16)

    def batch_loss(self, emb, img_ids, epoch):
        img = torch.nn.functional.normalize(self.head(emb["img"]), dim=1)
        return self.criterion({"img": img, "cap": emb["cap"]}, {"img_ids": img_ids}, epoch)


def _hrem(loss):
    return {"model": {"name": "hrem", "embed_dim": 16, "nhead": 4, "topk": 3, "relation_words": 12,
                      "interaction_warmup_epochs": 0, "region_drop": 0.0, "caption_aug": 0.0, "base_loss": loss,
                      "gnn_loss": loss, "trip_cutoff": 1.99, "text": GRU_WORDS},
            "loss": {"warmup_epochs": 1}}


def _selfalign(kind):
    common = {"embed_dim": 16, "prototypes": 24, "negatives": 7}
    model = ({"name": "selfalign_vsrn", **common, "text": GRU, "caption_hidden": 8, "caption_word_dim": 6}
             if kind == "vsrn" else
             {"name": "selfalign_camera", **common, "heads": 2, "views": 3, "text": {"name": "hf", "freeze": False}})
    return {"model": model, "data": {"max_words": 12}}


def _scan(direction):
    t2i = direction == "t2i"
    return {"model": {"name": "scan", "embed_dim": 16, "direction": direction, "lambda_softmax": 9.0 if t2i else 4.0,
                      "lambda_lse": 6.0 if t2i else 5.0, "text": {**GRU_WORDS, "mask_word": False}},
            "loss": {"mask_same_image": True}}


TGDT = ["model.embed_dim=16", "model.ff_dim=32", "model.heads=2", "model.text.word_dim=8", "model.text.min_count=1",
        "model.dropout=0.0", "loss.warmup_epochs=0"]
DIME = ["model.embed_dim=16", "model.heads=2", "model.hid_imrc=16", "model.hid_router=16", "model.path_hid=8",
        "model.direction=i2t"]
TERAN_ENTRY = {"recipe": {"model": {"name": "teran", "embed_dim": 16, "image_layers": 1, "layers": 1, "heads": 2,
                                    "ff_dim": 32, "dropout": 0.0, "text_layers": 0, "drop_last_word": False,
                                    "text": {"name": "hf_words"}},
                          "loss": {"mask_same_image": True}},
               "bert": True, "eval": ["txt_enc.backbone"]}  # BERT's own dropout 0.1
SENTENCE_MATCHER = {"model": {
    "name": "sentence_matcher", "embed_dim": 16, "mlp_dim": 24, "text": {"name": "hf", "pool": "cls"},
    "image": {"name": "xmatching_resnet", "depths": [1, 1], "hidden_sizes": [8, 16], "embedding_size": 8,
              "layer_type": "basic", "finetune": True, "freeze_stem": True, "frozen_bn": True}},
    "loss": {"margin": 0.5}}

# name -> recipe: a dict, or a recipes/ path with "over"rides; "bert": model.text.path is the given tiny
# BERT; "eval": "all" or submodules put in eval mode; "epoch" of the step (default 0); "pixels": an image
# model (uint8 pixels instead of region features); "img_ids"; "build": a model class instead of the registry's;
# "regions": each pair's region count (features and boxes zero past it, ``feat_lens``).
MODELS = {
    "vsepp": {"recipe": {"model": {"name": "vsepp", "embed_dim": 16, "text": GRU}}},
    # InfoNCE: the learnable temperature is a batch-level parameter (criterion.logit_scale)
    "vsepp_infonce": {"recipe": {"model": {"name": "vsepp", "embed_dim": 16, "text": GRU}, "loss": {"name": "infonce"}}},
    "vsepp_infonce_multi": {"recipe": {"model": {"name": "vsepp", "embed_dim": 16, "text": GRU},
                                       "loss": {"name": "infonce", "multi_positive": True}}},
    "vsepp_head": {"recipe": {"model": {"name": "vsepp", "embed_dim": 16, "text": GRU}}, "build": WithBatchHead},
    # the instance level (transformer with dropout 0.1, relation MLPs, sampled triplet negatives) live
    "hrem_trip": {"recipe": _hrem("trip"), "epoch": 1, "eval": ["img_fc", "img_rel", "txt_enc", "txt_rel"]},
    "hrem_vse": {"recipe": _hrem("vse"), "epoch": 1, "eval": ["img_fc", "img_rel", "txt_enc", "txt_rel"]},
    # epoch 1: the prototypes are not frozen; their Sinkhorn codes come from the global batch
    "selfalign_vsrn": {"recipe": _selfalign("vsrn"), "epoch": 1, "eval": "all"},
    "selfalign_camera": {"recipe": _selfalign("camera"), "bert": True, "epoch": 1, "eval": "all"},
    # partners (i, i + 4): 1/5 show the same image; 0 and 2 are on rank 0, their partners 4 and 6 on rank 1
    "sentence_matcher": {"recipe": SENTENCE_MATCHER, "bert": True, "pixels": True, "eval": "all",
                         "img_ids": [0, 1, 2, 3, 4, 1, 6, 7]},
    "scan_t2i": {"recipe": _scan("t2i")},
    "scan_i2t": {"recipe": _scan("i2t")},
    # variable region counts (bottom-up TSVs): each micro-batch padded to its own longest image, as the loader pads
    "vsepp_regions": {"recipe": {"model": {"name": "vsepp", "embed_dim": 16, "text": GRU}}, "regions": REGIONS},
    "scan_t2i_regions": {"recipe": _scan("t2i"), "regions": REGIONS},
    "scan_i2t_regions": {"recipe": _scan("i2t"), "regions": REGIONS},
    "vsrn_regions": {"recipe": {"model": {"name": "vsrn", "embed_dim": 16, "text": GRU, "caption_hidden": 8,
                                          "caption_word_dim": 6}}, "regions": REGIONS, "eval": "all"},
    "camera_regions": {"recipe": {"model": {"name": "camera", "embed_dim": 16, "heads": 2, "views": 3,
                                            "text": {"name": "hf", "freeze": False}}},
                       "bert": True, "regions": REGIONS, "eval": "all"},
    "selfalign_vsrn_regions": {"recipe": _selfalign("vsrn"), "epoch": 1, "eval": "all", "regions": REGIONS},
    "selfalign_camera_regions": {"recipe": _selfalign("camera"), "bert": True, "epoch": 1, "eval": "all",
                                 "regions": REGIONS},
    "teran": TERAN_ENTRY,
    "teran_regions": {**TERAN_ENTRY, "regions": REGIONS},
    "tgdt": {"recipe": "recipes/synthetic/tgdt.yaml", "over": TGDT},
    "tgdt_regions": {"recipe": "recipes/synthetic/tgdt.yaml", "over": TGDT, "regions": REGIONS},
    # i2t: no per-micro-batch BatchNorm on the image side; the frozen text model's dropout off
    "dime_i2t": {"recipe": "recipes/synthetic/dime_t2i.yaml", "over": DIME, "bert": True, "eval": ["txt_enc"]},
    "dime_i2t_regions": {"recipe": "recipes/synthetic/dime_t2i.yaml", "over": DIME, "bert": True, "eval": ["txt_enc"],
                         "regions": REGIONS},
}


def build(name, bert=None, global_negatives=None):
    """(model, tokenizer) of a MODELS entry, seeded, with its split-dependent parts in eval mode."""
    entry = MODELS[name]
    over = list(entry.get("over", []))
    if entry.get("bert"):
        if not bert:
            raise ValueError(f"model {name} needs a tiny BERT directory (launch_steps(..., bert=tiny_bert))")
        over.append(f"model.text.path={bert}")
    if global_negatives is not None:
        over.append(f"loss.global_negatives={str(global_negatives).lower()}")
    spec = entry["recipe"]
    recipe = load_recipe(ROOT / spec, over) if isinstance(spec, str) else load_recipe(raw=spec, overrides=over)
    tok = make_tokenizer(recipe, captions=CAPS)
    img_dim = 0 if entry.get("pixels") else D
    torch.manual_seed(0)
    if "build" in entry:
        model = entry["build"](model_config(recipe)[1], img_dim, tok, recipe.loss)
    else:
        model = build_model(recipe, img_dim, tok)
    mode = entry.get("eval", [])
    for m in [model] if mode == "all" else [model.get_submodule(k) for k in mode]:
        m.eval()
    return model, tok


def global_batch(name):
    """The fixed global batch, the same in every process (its own generator)."""
    entry = MODELS[name]
    g = torch.Generator().manual_seed(1)
    if entry.get("pixels"):
        return {"pixels": torch.randint(0, 256, (B, 3, 32, 32), generator=g, dtype=torch.uint8),
                "img_ids": torch.tensor(entry.get("img_ids", SAME_IMAGE))}
    xy = torch.rand(B, R, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + 0.1 + 0.4 * torch.rand(B, R, 2, generator=g)], dim=-1)
    out = {"feats": torch.randn(B, R, D, generator=g), "boxes": boxes,
           "img_ids": torch.tensor(entry.get("img_ids", SAME_IMAGE))}
    if entry.get("regions"):
        lens = torch.tensor(entry["regions"])
        pad = torch.arange(R)[None] >= lens[:, None]
        out.update(feats=out["feats"].masked_fill(pad[..., None], 0), boxes=boxes.masked_fill(pad[..., None], 0),
                   feat_lens=lens)
    return out


def micro_batches(name, tok, rank, world, accum):
    """This rank's contiguous share of the global batch, in ``accum`` micro-batches, each padded to its
    own longest caption as the loader pads."""
    batch, n = global_batch(name), B // world
    out = []
    for a in range(accum):
        idx = list(range(rank * n + a * n // accum, rank * n + (a + 1) * n // accum))
        ids, lens = collate_tokens([tok.encode(CAPS[i]) for i in idx], tok.pad_id)
        mb = {**{k: v[idx] for k, v in batch.items()}, "text_ids": ids, "text_lens": lens}
        if "feat_lens" in mb:  # cut to this micro-batch's longest image
            r = int(mb["feat_lens"].max())
            mb.update(feats=mb["feats"][:, :r], boxes=mb["boxes"][:, :r])
        out.append(mb)
    return out


def step(model, accum=1, global_negatives=None, bert=None):
    """{"loss" (summed over ranks), "grads", "world", "main"} of one step of MODELS[model], on every rank."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()  # a fresh accelerator for this run; the process group stays
    GradientState._reset_state()
    net, tok = build(model, bert, global_negatives)
    acc = make_accelerator(grad_accum=accum, cpu=True)
    world, rank = acc.num_processes, acc.process_index
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.0)
    net, opt = acc.prepare(net, opt)
    micro = micro_batches(model, tok, rank, world, accum)
    torch.manual_seed(1000 + 10 * rank + accum)  # batch-level randomness must be seeded by the batch, not by this
    loss = train_step(net, micro, MODELS[model].get("epoch", 0), acc, Precision("no", "cpu"), world)
    total = all_reduce_sum(loss.reshape(1)).item()
    grads = {k: p.grad.detach().clone() for k, p in acc.unwrap_model(net).named_parameters() if p.grad is not None}
    return {"loss": total, "grads": grads, "world": world, "main": acc.is_main_process}


def run_all(spec):
    """The results of ``spec["runs"]`` (dicts of ``step``'s arguments), in order; on rank 0, None elsewhere."""
    results = [step(**run, bert=spec.get("bert")) for run in spec["runs"]]
    if not results[0].pop("main"):
        return None
    for r in results[1:]:
        r.pop("main")
    return results


def main(out, spec):
    from itr.distributed import finish_job

    results = run_all(json.loads(spec))
    if results is not None:
        torch.save(results, out)
    finish_job()  # every rank leaves the process group: one exiting with gloo's threads up can abort


if __name__ == "__main__":
    main(*sys.argv[1:])
