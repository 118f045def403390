"""`itr import --from tgdt`: a checkpoint in LCFractal/TGDT's exact layout (TERAN's dict and keys plus the second
stage ``transformer_encoder_text`` / ``_img`` and the modules no forward runs; random weights, a tiny BERT)
becomes an itr run directory whose global, local and global + local scores equal the reference's test forward
(``switch_test``: local tokens from the first stage, the global token at position 0 of the second) written out
from the checkpoint's tensors. The test mode follows the stored loss-type or ``--set``; ``model.drop_last_word``
(the recipe key this importer needs) is checked on its own. Refusals: options itr's tgdt does not compute, a
TERAN checkpoint (no second stage)."""
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from itr.errors import CheckpointError, ConfigError
from itr.imports import ImportRequest, import_checkpoint

from conftest import tiny_overrides
from test_import_teran import (D, E, batch, config, ref_image_stage1, ref_mrsw, ref_text_stage1, ref_tf,
                               save_reference, state_of, teran_modules, tf, tokens)


def tgdt_config(**changes):
    """configs/f30k_all.yaml@067ee00 at tiny sizes."""
    base = {"model.name": "baseline", "training.loss-type": "alignment+matching", "training.matching-weight": 1,
            "training.alignment-weight": 1}
    return config(**{**base, **changes})


def tgdt_checkpoint(path, bert_dir, seed=0, **changes):
    """BASELINE.state_dict() (models/baseline.py@067ee00): TERAN's modules, the second stage, the unused ones."""
    cfg = tgdt_config(**changes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mods = teran_modules(bert_dir, cfg)
        n = cfg["model"]["layers"]

        def mlp():
            return nn.Sequential(nn.Linear(E, E), nn.ReLU(), nn.Linear(E, E // 2), nn.ReLU(), nn.Linear(E // 2, E))

        mods.update({"img_txt_enc.text_agg_emb.": mlp(), "img_txt_enc.img_agg_emb.": mlp(),
                     "img_txt_enc.transformer_encoder_text.": tf(E, n),
                     "img_txt_enc.transformer_encoder_img.": tf(E, n),
                     "img_first_emb.": nn.Linear(E, E), "cap_first_emb.": nn.Linear(E, E)})
        state = state_of(mods, seed)
    save_reference(path, state, cfg, num_epochs=60)
    return state, cfg


def reference_scores(state, bert_dir, feats, boxes, ids, lens):
    """(global, local) score matrices of JointTextImageTransformerEncoder.forward with istest=True and
    evaluate_utils/evaluation.py: global = position 0 of the second stage (each caption alone: the reference's
    second text stage has no padding mask), local = 10 x MrSw of the normalized first stage."""
    with torch.no_grad():
        img1 = ref_image_stage1(state, feats, boxes)
        img_g = F.normalize(ref_tf(state, "img_txt_enc.transformer_encoder_img.", E)(img1)[0], dim=1)
        cap1 = ref_text_stage1(state, bert_dir, ids, lens)
        cap_g = []
        for i, n in enumerate(lens.tolist()):
            alone = ref_text_stage1(state, bert_dir, ids[i:i + 1, :n], lens[i:i + 1])
            cap_g.append(F.normalize(ref_tf(state, "img_txt_enc.transformer_encoder_text.", E)(alone)[0, 0], dim=0))
        local = ref_mrsw(F.normalize(img1, dim=2).permute(1, 0, 2), F.normalize(cap1, dim=2).permute(1, 0, 2),
                         [feats.shape[1] + 1] * feats.shape[0], lens.tolist(), scale=10.0)
    return img_g @ torch.stack(cap_g).t(), local


@pytest.fixture
def imported(tmp_path, tiny_bert):
    state, _ = tgdt_checkpoint(tmp_path / "model_best_rsum.pth.tar", tiny_bert)
    ck = tmp_path / "model_best_rsum.pth.tar"
    best = import_checkpoint(ImportRequest(ck, "tgdt", tmp_path / "run", bert=tiny_bert))
    return best, state


def test_the_mapping_is_complete_and_every_test_mode_is_the_references(imported, tiny_bert):
    from itr.checkpoint import load_for_eval

    best, state = imported
    model, tok, recipe, meta = load_for_eval(best)
    m = recipe.model
    assert meta["imported"]["family"] == "tgdt"
    assert meta["imported"]["options"]["training.loss-type"] == "alignment+matching"
    assert (m.name, m.test_mode, m.layers, m.global_layers, m.image_layers) == ("tgdt", "sum", 2, 2, 2)
    assert m.bert_layers == 1
    assert m.drop_last_word and m.box_encoding and m.local_scale == 10.0 and m.consistency_margin == 0.3
    assert recipe.train.epochs == 60 and recipe.optim.warmup_steps == 1000 and recipe.data.name == "f30k"
    torch.testing.assert_close(model.txt_global.layers[0].self_attn.out_proj.weight,
                               state["img_txt_enc.transformer_encoder_text.layers.0.self_attn.out_proj.weight"])
    torch.testing.assert_close(model.img_local.layers[1].norm2.weight,
                               state["img_txt_enc.transformer_encoder_2.layers.1.norm2.weight"])
    torch.testing.assert_close(model.box_map[0].weight, state["img_txt_enc.img_enc.pos_encoding_image.map.0.weight"])
    p = "img_txt_enc.img_enc.pos_encoding_image.map."
    slot = F.linear(F.relu(state[p + "0.bias"]), state[p + "2.weight"], state[p + "2.bias"])  # zero feature, zero box
    torch.testing.assert_close(model.img_cls, slot)
    feats, boxes = batch()
    ids, lens = tokens(tok)
    glob, local = reference_scores(state, tiny_bert, feats, boxes, ids, lens)
    with torch.no_grad():
        img = model.embed_images({"feats": feats, "boxes": boxes})
        cap = model.embed_captions({"text_ids": ids, "text_lens": lens})
        for mode, ref in (("global", glob), ("local", local), ("sum", glob + local)):
            model.cfg.test_mode = mode
            torch.testing.assert_close(model.score(img, cap), ref, rtol=1e-4, atol=1e-4,
                                       msg=lambda s, m=mode: f"{m}: {s}")


@pytest.mark.parametrize("loss_type,override,mode", [("matching", None, "global"), ("alignment", None, "local"),
                                                     ("alignment+matching", "model.test_mode=local", "local")])
def test_the_test_mode_follows_the_stored_loss_type_or_set(tmp_path, tiny_bert, loss_type, override, mode):
    from itr.checkpoint import load_for_eval

    tgdt_checkpoint(tmp_path / "ck.pth", tiny_bert, **{"training.loss-type": loss_type})
    best = import_checkpoint(ImportRequest(tmp_path / "ck.pth", "tgdt", tmp_path / "run", bert=tiny_bert,
                                           overrides=(override,) if override else ()))
    assert load_for_eval(best)[2].model.test_mode == mode


def test_the_imported_run_evaluates_in_two_stages_and_fine_tunes(imported, tmp_path):
    from itr.config import load_recipe
    from itr.data.synthetic import generate
    from itr.eval.job import run_eval
    from itr.train import train
    from safetensors.torch import load_file

    best, _ = imported
    data = generate(tmp_path / "data", splits=(("train", 40), ("dev", 10), ("test", 10)), dim=D, regions=4, seed=2)
    full = run_eval(best, data, "test", chunk_size=16)
    assert run_eval(best, data, "test", chunk_size=16, two_stage=50)["rsum"] == pytest.approx(full["rsum"])  # K = all
    over = tiny_overrides(data, **{"train.epochs": 1, "train.max_steps": 2, "train.batch_size": 20, "optim.lr": 0.0,
                                   "optim.warmup_steps": 0, "tracking.enabled": "false", "model.embed_dim": E,
                                   "eval.chunk_size": 16})
    over = [o for o in over if not o.startswith("model.text.word_dim")] + [f"train.init_from={tmp_path / 'run'}"]
    train(load_recipe(best / "recipe.yaml", over), tmp_path / "ft")
    a, b = load_file(str(best / "model.safetensors")), load_file(str(tmp_path / "ft" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_without_box_encoding_the_global_slot_is_zero_and_no_boxes_are_needed(tmp_path, tiny_bert):
    from itr.checkpoint import load_for_eval

    state, _ = tgdt_checkpoint(tmp_path / "ck.pth", tiny_bert, **{"image-model.pos-encoding": None})
    model, tok, recipe, _ = load_for_eval(import_checkpoint(ImportRequest(tmp_path / "ck.pth", "tgdt", tmp_path / "run",
                                                                          bert=tiny_bert)))
    assert not recipe.model.box_encoding and model.box_map is None and not model.img_cls.any()
    feats, boxes = batch()
    ids, lens = tokens(tok)
    glob, local = reference_scores(state, tiny_bert, feats, boxes, ids, lens)
    with torch.no_grad():
        got = model.score(model.embed_images({"feats": feats}),
                          model.embed_captions({"text_ids": ids, "text_lens": lens}))
    torch.testing.assert_close(got, glob + local, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("key,value", [("model.shared-transformer", True), ("model.text-aggregation", "gated"),
                                       ("image-model.pos-encoding", "project-and-sum"),
                                       ("training.loss-type", "alignment+x"), ("training.alignment-mode", "MwSr")])
def test_options_itr_does_not_compute_are_refused_by_name(tmp_path, tiny_bert, key, value):
    tgdt_checkpoint(tmp_path / "ck.pth", tiny_bert, **{key: value})
    with pytest.raises(CheckpointError, match=re.escape(f"ck.pth: config {key}={value!r}")):
        import_checkpoint(ImportRequest(tmp_path / "ck.pth", "tgdt", tmp_path / "run", bert=tiny_bert))
    assert not (tmp_path / "run" / "best").exists()


def test_a_teran_checkpoint_names_the_missing_second_stage(tmp_path, tiny_bert):
    from test_import_teran import teran_checkpoint

    teran_checkpoint(tmp_path / "teran.pth", tiny_bert)
    with pytest.raises(CheckpointError, match=r"teran\.pth does not map .*missing: \['img_global\.layers\.0\."):
        import_checkpoint(ImportRequest(tmp_path / "teran.pth", "tgdt", tmp_path / "run", bert=tiny_bert))


def test_drop_last_word_leaves_the_token_before_sep_out(tiny_bert):
    """model.drop_last_word (LCFractal/TGDT models/loss.py@067ee00 s_len - 3): one local token fewer per caption, the
    others unchanged; a word-level GRU has no [SEP] to count from."""
    from itr.config import load_recipe
    from itr.models import build_model, make_tokenizer

    from conftest import ROOT

    small = ["model.embed_dim=16", "model.ff_dim=32", "model.heads=2", "model.dropout=0.0", "model.text=hf_words",
             f"model.text.path={tiny_bert}", "model.bert_layers=1"]
    models = []
    for drop in (False, True):
        r = load_recipe(ROOT / "recipes" / "synthetic" / "tgdt.yaml", small + [f"model.drop_last_word={drop}"])
        tok = make_tokenizer(r)
        torch.manual_seed(0)
        models.append(build_model(r, D, tok).eval())
    ids, lens = tokens(tok)
    with torch.no_grad():
        keep, drop = (m.embed_captions({"text_ids": ids, "text_lens": lens}) for m in models)
    assert keep["lens"].tolist() == (lens - 2).tolist() and drop["lens"].tolist() == (lens - 3).tolist()
    for i, n in enumerate(drop["lens"].tolist()):
        torch.testing.assert_close(drop["words"][i, :n], keep["words"][i, :n])
    r = load_recipe(ROOT / "recipes" / "synthetic" / "tgdt.yaml", ["model.drop_last_word=true"])
    with pytest.raises(ConfigError, match="drop_last_word"):
        build_model(r, D, make_tokenizer(r, captions=["a dog"]))


def test_the_cli_sets_the_test_mode(tmp_path, tiny_bert):
    import yaml

    from itr.cli import main

    tgdt_checkpoint(tmp_path / "ck.pth", tiny_bert)
    assert main(["import", str(tmp_path / "ck.pth"), "--from", "tgdt", "--out", str(tmp_path / "run"), "--bert",
                 str(tiny_bert), "--set", "model.test_mode=global"]) == 0
    assert yaml.safe_load((tmp_path / "run" / "best" / "recipe.yaml").read_text())["model"]["test_mode"] == "global"
