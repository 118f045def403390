"""`itr import --from hrem`: a checkpoint in CrossmodalGroup/HREM's exact layout (the two encoders only,
``module.`` keys of a --multi_gpu run, BERT's pooler and position-id buffer, FC_MLP's unused last BatchNorm, the
fragment-relation transformers as ``aggr.layers.0``), random weights and the options of arguments.py +
graph_lib.py, becomes an itr run directory that evaluates; the embeddings are checked against a forward written
out by hand (FC_MLP, max-2 pooling, a sequence-first transformer layer with the options' head count, average
pooling, 0.8 / 0.2 mix, L2). The instance-level interaction, which the checkpoint does not hold, keeps itr's
initialization. Refusals: a BiGRU text encoder, unnormalized embeddings, a wrong shape, a forbidden global."""
import argparse

import pytest
import torch
import torch.nn.functional as F

from itr.errors import CheckpointError
from itr.imports import ImportRequest, import_checkpoint

from test_import_vse_infty import (D, E, R, Evil, bert_state, mlp_state, randomized, ref_bert_tokens, ref_fc_mlp,
                                   state_dict)

NHEAD = 2  # not 16 (graph_lib.py's default): the head count comes from the options, not from the shapes


def options(**over):
    """arguments.py@30388ea + graph_lib.py@30388ea extra_parameters, as the README's f30k command sets them."""
    opt = dict(data_path="data/", dataset="f30k", margin=0.2, num_epochs=30, batch_size=128, embed_size=E,
               grad_clip=2.0, learning_rate=5e-4, workers=8, log_step=200, val_step=500, logger_name="runs/f30k_test",
               model_name="runs/f30k_test", max_violation=True, img_dim=D, no_imgnorm=False, no_txtnorm=False,
               vse_mean_warmup_epochs=1, multi_gpu=1, size_augment=1, mask_repeat=1, save_results=1, gpu_id=0,
               bert_path="data/bert-base-uncased", lr_schedules=[15, 25], decay_rate=0.1, base_loss="trip",
               gnn_loss="trip", warmup=8000, residual_weight=0.8, num_layers_enc=1, nhead=NHEAD, dropout=0.1,
               graph_lr_factor=1.0, mask_weight=1.0, threshold=0.5, topk=10, reg_loss_weight=10, norm_input=1,
               cross_loss=1)
    opt.update(over)
    return argparse.Namespace(**opt)


def aggr_state(g, prefix):
    """nn.TransformerEncoder(TransformerEncoderLayer(embed, nhead, dim_feedforward=embed), num_layers=1)."""
    layer = torch.nn.TransformerEncoderLayer(E, NHEAD, dim_feedforward=E, dropout=0.1)
    return randomized(layer, g, prefix + "layers.0.")


def hrem_checkpoint(path, bert_dir, seed=0, text="bert", **opt):
    """lib/vse.py@3ae350e state_dict: [img_enc, txt_enc] (module. prefixed: multi_gpu 1); no criterion."""
    g = torch.Generator().manual_seed(seed)
    img = {**randomized(torch.nn.Linear(D, E), g, "fc.fc."), **mlp_state(g, "fc.mlp.", D), **aggr_state(g, "aggr.")}
    if text == "bert":
        bert, cfg = bert_state(bert_dir, seed + 1)
        txt = {**bert, **randomized(torch.nn.Linear(cfg.hidden_size, E), g, "linear."), **aggr_state(g, "aggr.")}
    else:  # the paper's BiGRU variant, not in the released code
        txt = {"embed.weight": torch.randn(20, 8, generator=g), **randomized(torch.nn.GRU(8, E), g, "rnn.")}
    model = [state_dict(s, "module.") for s in (img, txt)]
    torch.save({"model": model, "opt": options(**opt), "epoch": 30, "best_rsum": 520.0, "Eiters": 33960}, path)
    return img, txt


def ref_side(x, lens, state, w=0.8):
    """EncoderImageAggr / EncoderText_BERT after the features: w * mean of the top 2 + (1 - w) * mean of the
    sequence-first transformer layer's outputs, per sample over its own length, then l2norm."""
    layer = torch.nn.TransformerEncoderLayer(E, NHEAD, dim_feedforward=E, dropout=0.1).eval()
    layer.load_state_dict({k[len("aggr.layers.0."):]: v for k, v in state.items() if k.startswith("aggr.layers.0.")})
    out = []
    for xi, n in zip(x, lens.tolist()):
        xi = xi[:n]
        out.append(w * xi.topk(min(2, n), dim=0).values.mean(0) + (1 - w) * layer(xi[:, None])[:, 0].mean(0))
    out = torch.stack(out)
    return out / out.norm(dim=1, keepdim=True)


@pytest.fixture
def imported(tmp_path, tiny_bert):
    img, txt = hrem_checkpoint(tmp_path / "model_best.pth", tiny_bert)
    best = import_checkpoint(ImportRequest(tmp_path / "model_best.pth", "hrem", tmp_path / "run", bert=tiny_bert))
    return best, img, txt


def test_the_released_layout_maps_completely_and_forwards_as_the_reference(imported, tiny_bert):
    from transformers import BertConfig

    from itr.checkpoint import load_for_eval

    best, img, txt = imported
    model, tok, recipe, meta = load_for_eval(best)
    assert meta["imported"]["family"] == "hrem" and meta["imported"]["initialized_fresh"] == ["interaction."]
    m = recipe.model
    assert (m.name, m.text.name, m.embed_dim, m.nhead, m.residual_weight) == ("hrem", "hf_words", E, NHEAD, 0.8)
    assert (m.pool_k, m.interaction_warmup_epochs, m.trip_cutoff) == (2, 7, 1.7)  # 8000 / (145000 // 128)
    assert recipe.loss.mask_same_image and recipe.optim.lr_update == 15 and recipe.eval.protocol == "1k"
    torch.testing.assert_close(model.img_fc.mlp.bns[0].running_mean, img["fc.mlp.bns.0.running_mean"])
    torch.testing.assert_close(model.img_rel.aggr.self_attn.in_proj_weight,
                               img["aggr.layers.0.self_attn.in_proj_weight"])
    torch.testing.assert_close(model.txt_rel.aggr.norm2.bias, txt["aggr.layers.0.norm2.bias"])
    torch.testing.assert_close(model.txt_enc.backbone.embeddings.word_embeddings.weight,
                               txt["bert.embeddings.word_embeddings.weight"])
    feats = torch.randn(3, R, D)
    ids = [tok.encode(c) for c in ["a red dog runs on the grass", "a cat near a bike"]]
    lens = torch.tensor([len(i) for i in ids])
    padded = torch.tensor([i + [0] * (int(lens.max()) - len(i)) for i in ids])
    with torch.no_grad():
        ref = ref_side(ref_fc_mlp(feats, img, "fc.fc.", "fc.mlp."), torch.full((3,), R), img)
        torch.testing.assert_close(model.embed_images({"feats": feats}), ref)
        words = ref_bert_tokens(padded, txt, BertConfig.from_pretrained(tiny_bert))
        ref = ref_side(F.linear(words, txt["linear.weight"], txt["linear.bias"]), lens, txt)
        torch.testing.assert_close(model.embed_captions({"text_ids": padded, "text_lens": lens}), ref)


def test_the_import_evaluates(imported, tmp_path):
    from itr.data.synthetic import generate
    from itr.eval.job import run_eval

    data = generate(tmp_path / "data", splits=(("test", 10),), dim=D, regions=R, seed=3)
    assert 0 <= run_eval(imported[0], data, "test")["rsum"] <= 600


def test_the_coco_options_read_as_coco(tmp_path, tiny_bert):
    from itr.imports import hrem

    hrem_checkpoint(tmp_path / "ck.pth", tiny_bert, dataset="coco", batch_size=256, mask_weight=1.5)
    ckpt = torch.load(tmp_path / "ck.pth", weights_only=False)
    conv = hrem.convert(ckpt, vars(ckpt["opt"]), ImportRequest(tmp_path / "ck.pth", "hrem", tmp_path / "r"))
    r = conv["recipe"]
    assert r["data"] == {"name": "coco", "root": "data/coco_precomp", "test_split": "testall"}
    assert (r["eval"]["protocol"], r["model"]["trip_cutoff"], r["model"]["mask_weight"]) == ("coco-5fold", 1.9, 1.5)
    assert r["model"]["interaction_warmup_epochs"] == 4  # 8000 / (566435 // 256) = 3.6
    assert not any(k.startswith("interaction.") for k in conv["weights"]) and conv["fresh"] == ("interaction.",)


@pytest.mark.parametrize("case, expect", [
    ("bigru", r"has no bert\.\* \(EncoderText_BERT\)"),
    ("no_txtnorm", r"--no_txtnorm; itr's model L2-normalizes"),
    ("shape", r"img_fc\.fc\.weight: itr expects \(32, 12\), the checkpoint has \(16, 12\)"),
])
def test_what_itr_cannot_represent_is_a_clear_error(tmp_path, tiny_bert, case, expect):
    over = {"bigru": {"text": "bigru"}, "no_txtnorm": {"no_txtnorm": True}, "shape": {"embed_size": 32}}[case]
    hrem_checkpoint(tmp_path / "ck.pth", tiny_bert, **over)
    with pytest.raises(CheckpointError, match=expect):
        import_checkpoint(ImportRequest(tmp_path / "ck.pth", "hrem", tmp_path / "run", bert=tiny_bert))
    assert not (tmp_path / "run" / "best").exists()


def test_a_forbidden_pickle_global_is_refused_naming_the_file(tmp_path, tiny_bert):
    img, txt = hrem_checkpoint(tmp_path / "ok.pth", tiny_bert)
    torch.save({"model": [img, txt], "opt": options(), "extra": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"refusing to unpickle .*evil\.pth: it needs the global"):
        import_checkpoint(ImportRequest(tmp_path / "evil.pth", "hrem", tmp_path / "run", bert=tiny_bert))
    assert not (tmp_path / "run" / "best").exists()
