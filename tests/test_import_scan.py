"""`itr import --from scan`: checkpoints in kuanghuei/SCAN's exact layout (random weights, train.py's options object,
vocab.py's JSON vocabulary), t2i and i2t, become itr run directories that evaluate; the scores are checked against
SCAN's func_attention / xattn_score_* written out by hand from the checkpoint's tensors. Refusals: options itr's
scan lacks (named), a wrong vocabulary size, a forbidden pickle global."""
import argparse
import json

import pytest
import torch
import torch.nn.functional as F

from itr.errors import CheckpointError
from itr.imports import ImportRequest, import_checkpoint

from test_import_vsepp import Evil

WORDS = ["a", "dog", "cat", "red", "runs", "on", "the", "grass", "near", "bike"]
E, W, D = 16, 8, 32  # embed, word dim, image feature dim


def write_json_vocab(path, words=WORDS):
    """vocab.py@19e8d2f ``serialize_vocab``: word2idx, idx2word (JSON turns its int keys into strings), idx."""
    words = ["<pad>", "<start>", "<end>", "<unk>"] + list(words)
    path.write_text(json.dumps({"word2idx": {w: i for i, w in enumerate(words)},
                                "idx2word": {str(i): w for i, w in enumerate(words)}, "idx": len(words)}))
    return len(words)


def gru_state(g, prefix, in_dim, hidden, bidirectional):
    out = {}
    for sfx in ("", "_reverse") if bidirectional else ("",):
        out.update({f"{prefix}weight_ih_l0{sfx}": torch.randn(3 * hidden, in_dim, generator=g) * 0.3,
                    f"{prefix}weight_hh_l0{sfx}": torch.randn(3 * hidden, hidden, generator=g) * 0.3,
                    f"{prefix}bias_ih_l0{sfx}": torch.randn(3 * hidden, generator=g) * 0.1,
                    f"{prefix}bias_hh_l0{sfx}": torch.randn(3 * hidden, generator=g) * 0.1})
    return out


def scan_checkpoint(path, vocab_size, seed=0, img=None, **opt):
    """``{epoch, model: [img_enc, txt_enc], best_rsum, opt, Eiters}``: EncoderImagePrecomp and EncoderText keys,
    train.py@0474a17's option names (``opt.vocab_size`` as train.py adds it)."""
    options = dict(data_path="./data/", data_name="f30k_precomp", vocab_path="./vocab/", margin=0.2, num_epochs=30,
                   batch_size=128, word_dim=W, embed_size=E, grad_clip=2.0, num_layers=1, learning_rate=2e-4,
                   lr_update=15, workers=10, log_step=10, val_step=500, logger_name="runs/f30k_scan/log",
                   model_name="runs/f30k_scan/log", resume="", max_violation=True, img_dim=D, no_imgnorm=False,
                   no_txtnorm=False, raw_feature_norm="clipped_l2norm", agg_func="LogSumExp", cross_attn="t2i",
                   precomp_enc_type="basic", bi_gru=True, lambda_lse=6.0, lambda_softmax=9.0, vocab_size=vocab_size)
    options.update(opt)
    g = torch.Generator().manual_seed(seed)
    if img is None:
        img = {"fc.weight": torch.randn(E, D, generator=g) * 0.2, "fc.bias": torch.randn(E, generator=g) * 0.1}
    txt = {"embed.weight": torch.randn(vocab_size, W, generator=g) * 0.3,
           **gru_state(g, "rnn.", W, E, options["bi_gru"])}
    torch.save({"epoch": 29, "model": [img, txt], "best_rsum": 450.0, "opt": argparse.Namespace(**options),
                "Eiters": 6789}, path)
    return img, txt


def reference_words(txt, ids, lens, bi_gru=True):
    """EncoderText: embed -> (Bi)GRU over the valid words (pack_padded_sequence) -> the two directions averaged ->
    l2norm per word."""
    gru = torch.nn.GRU(W, E, 1, batch_first=True, bidirectional=bi_gru)
    gru.load_state_dict({k[4:]: v for k, v in txt.items() if k.startswith("rnn.")})
    words = []
    for i, n in enumerate(lens.tolist()):
        o = gru(F.embedding(ids[i:i + 1, :n], txt["embed.weight"]))[0][0]
        if bi_gru:
            o = (o[:, :E] + o[:, E:]) / 2
        words.append(o / (o.norm(dim=1, keepdim=True) + 1e-8))
    return words


def reference_score(v, w, direction, lam_softmax, lam_lse):
    """func_attention + cosine + LogSumExp for one image v (R, E) and one caption's words w (n, E)."""
    query, context = (w, v) if direction == "t2i" else (v, w)
    raw = context @ query.t()  # (sourceL, queryL)
    raw = F.leaky_relu(raw, 0.1)
    raw = raw / (raw.norm(dim=1, keepdim=True) + 1e-8)  # clipped_l2norm over the queries
    attn = torch.softmax(lam_softmax * raw.t(), dim=1)  # (queryL, sourceL): over the context
    attended = attn @ context
    cos = (query * attended).sum(1) / (query.norm(dim=1) * attended.norm(dim=1)).clamp(min=1e-8)
    return torch.log(torch.exp(lam_lse * cos).sum()) / lam_lse


@pytest.mark.parametrize("direction,lam_softmax,lam_lse", [("t2i", 9.0, 6.0), ("i2t", 4.0, 5.0)])
def test_the_mapping_is_complete_and_the_scores_are_the_references(tmp_path, direction, lam_softmax, lam_lse):
    from itr.checkpoint import load_for_eval

    n = write_json_vocab(tmp_path / "f30k_precomp_vocab.json")
    img, txt = scan_checkpoint(tmp_path / "model_best.pth.tar", n, cross_attn=direction, lambda_softmax=lam_softmax,
                               lambda_lse=lam_lse)
    best = import_checkpoint(ImportRequest(tmp_path / "model_best.pth.tar", "scan", tmp_path / "run",
                                           vocab=tmp_path / "f30k_precomp_vocab.json"))
    model, tok, recipe, meta = load_for_eval(best)
    m = recipe.model
    assert meta["img_dim"] == D and meta["imported"]["family"] == "scan"
    assert (m.name, m.direction, m.lambda_softmax, m.lambda_lse, m.agg_func) == ("scan", direction, lam_softmax,
                                                                                 lam_lse, "LogSumExp")
    assert m.raw_feature_norm == "clipped_l2norm" and m.img_norm and m.txt_norm and m.text.config.bidirectional
    assert recipe.loss.max_violation and recipe.loss.mask_same_image is False and recipe.eval.protocol == "1k"
    torch.testing.assert_close(model.fc.weight, img["fc.weight"])
    torch.testing.assert_close(model.txt_enc.rnn.weight_hh_l0_reverse, txt["rnn.weight_hh_l0_reverse"])
    torch.testing.assert_close(model.txt_enc.embed.weight, txt["embed.weight"])
    feats = torch.randn(3, 5, D)
    ids = torch.tensor([tok.encode("a red dog runs") + [0], tok.encode("the cat near a bike")])
    lens = torch.tensor([6, 7])
    assert ids[0].tolist() == [1, 4, 7, 5, 8, 2, 0]  # <start> a red dog runs <end> <pad>: SCAN's ids
    with torch.no_grad():
        v = feats @ img["fc.weight"].t() + img["fc.bias"]  # EncoderImagePrecomp: fc, then l2norm per region
        v = v / (v.norm(dim=-1, keepdim=True) + 1e-8)
        torch.testing.assert_close(model.embed_images({"feats": feats}), v)
        cap = model.embed_captions({"text_ids": ids, "text_lens": lens})
        words = reference_words(txt, ids, lens)
        for c, w in enumerate(words):
            torch.testing.assert_close(cap["words"][c, :len(w)], w)
        got = model.score(model.embed_images({"feats": feats}), cap)
        ref = torch.tensor([[reference_score(v[i], w, direction, lam_softmax, lam_lse) for w in words]
                            for i in range(3)])
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_the_imported_run_evaluates_and_coco_options_map(tmp_path):
    from itr.checkpoint import load_for_eval
    from itr.data.synthetic import generate
    from itr.eval.job import run_eval

    n = write_json_vocab(tmp_path / "coco_precomp_vocab.json")
    scan_checkpoint(tmp_path / "model_best.pth.tar", n, data_name="coco_precomp", cross_attn="i2t", lambda_lse=20.0,
                    lambda_softmax=4.0, agg_func="Mean", bi_gru=False, num_epochs=20, lr_update=10,
                    learning_rate=5e-4)
    best = import_checkpoint(ImportRequest(tmp_path / "model_best.pth.tar", "scan", tmp_path / "run",
                                           vocab=tmp_path / "coco_precomp_vocab.json"))
    _, _, recipe, _ = load_for_eval(best)
    assert recipe.data.name == "coco" and recipe.data.test_split == "testall" and recipe.eval.protocol == "coco-5fold"
    assert recipe.model.agg_func == "Mean" and not recipe.model.text.config.bidirectional
    assert (recipe.optim.lr, recipe.optim.lr_update, recipe.train.epochs) == (5e-4, 10, 20)
    data = generate(tmp_path / "data", splits=(("train", 20), ("dev", 10), ("test", 10)), dim=D, regions=4, seed=2)
    m = run_eval(best, data, "test", protocol="1k")
    assert 0 <= m["rsum"] <= 600


@pytest.mark.parametrize("option,value,words", [
    ("precomp_enc_type", "weight_norm", "precomp_enc_type='weight_norm'"),
    ("cross_attn", "both", "cross_attn='both'"),
    ("agg_func", "Median", "agg_func='Median'"),
    ("raw_feature_norm", "l3norm", "raw_feature_norm='l3norm'"),
])
def test_options_itr_does_not_implement_are_refused_by_name(tmp_path, option, value, words):
    n = write_json_vocab(tmp_path / "v.json")
    scan_checkpoint(tmp_path / "ck.pth.tar", n, **{option: value})
    with pytest.raises(CheckpointError) as e:
        import_checkpoint(ImportRequest(tmp_path / "ck.pth.tar", "scan", tmp_path / "run", vocab=tmp_path / "v.json"))
    assert words in str(e.value) and "ck.pth.tar" in str(e.value)
    assert not (tmp_path / "run" / "best").exists()


def test_a_weight_normalized_fc_is_refused_even_without_the_option(tmp_path):
    n = write_json_vocab(tmp_path / "v.json")
    wn = {"fc.weight_g": torch.ones(()), "fc.weight_v": torch.randn(E, D), "fc.bias": torch.zeros(E)}
    scan_checkpoint(tmp_path / "ck.pth.tar", n, img=wn)
    with pytest.raises(CheckpointError, match="weight-normalized"):
        import_checkpoint(ImportRequest(tmp_path / "ck.pth.tar", "scan", tmp_path / "run", vocab=tmp_path / "v.json"))


def test_a_wrong_vocabulary_and_a_forbidden_global_give_clear_errors(tmp_path):
    write_json_vocab(tmp_path / "small.json", WORDS[:6])
    img, txt = scan_checkpoint(tmp_path / "ck.pth.tar", len(WORDS) + 4)
    with pytest.raises(CheckpointError) as e:
        import_checkpoint(ImportRequest(tmp_path / "ck.pth.tar", "scan", tmp_path / "run",
                                        vocab=tmp_path / "small.json"))
    assert "txt_enc.embed.weight: itr expects (10, 8), the checkpoint has (14, 8)" in str(e.value)
    torch.save({"model": [img, txt], "opt": Evil()}, tmp_path / "evil.pth.tar")
    with pytest.raises(CheckpointError, match=r"refusing to unpickle .*evil\.pth\.tar: it needs the global"):
        import_checkpoint(ImportRequest(tmp_path / "evil.pth.tar", "scan", tmp_path / "run",
                                        vocab=tmp_path / "small.json"))
    assert not (tmp_path / "run" / "best").exists()


def test_the_cli_offers_the_family_and_names_the_missing_vocabulary(tmp_path, capsys):
    from itr.cli import main

    scan_checkpoint(tmp_path / "ck.pth.tar", 14)
    assert main(["import", str(tmp_path / "ck.pth.tar"), "--from", "scan", "--out", str(tmp_path / "run")]) == 2
    assert "--vocab VOCAB" in capsys.readouterr().err
