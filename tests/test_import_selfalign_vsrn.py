"""`itr import --from selfalign_vsrn`: checkpoints in Zjamie813/SelfAlign vsrn_SelfAlign's exact layout ([img_enc,
txt_enc, region_loss], random weights, train_SelfAlign.py's options, the pickled vocabulary) become itr run
directories; the evaluation embeddings ([emb; 0.5 fused; 0.5 mean locals] / [emb; mean locals; fused]) are checked
against model_SelfAlign.py's encoders written out by hand, and the one documented difference (padding in the
caption's context features) is pinned down. Refusals: a VSRN checkpoint, a wrong shape, a forbidden pickle global."""
import pytest
import torch
import torch.nn.functional as F

from itr.errors import CheckpointError
from itr.imports import ImportRequest, import_checkpoint

from conftest import tiny_overrides
from test_import_vsepp import Evil, write_vocab
from test_import_vsrn import D, E, R, W, batchnorm, bn_eval, gru, l2, options, reference_image, rnd, vsrn_image_state

K = 24  # prototypes (--local_clu_num)


def context_head(g):
    """The CRA sub-module's keys in EncoderImagePrecompAttn / EncoderText (model_SelfAlign.py@26343b7)."""
    return {"ctx_fc.weight": rnd(g, E, E, scale=0.3), "ctx_fc.bias": rnd(g, E, scale=0.1),
            **batchnorm(g, "ctx_fc_bn1.", E), **batchnorm(g, "ctx_fc_bn2.", E),
            "fusion_fn.0.weight": rnd(g, E, 2 * E, scale=0.3), "fusion_fn.0.bias": rnd(g, E, scale=0.1),
            "fusion_fn.2.weight": rnd(g, 1, E, scale=0.3), "fusion_fn.2.bias": rnd(g, 1, scale=0.1)}


def selfalign_checkpoint(path, vocab_size, data_name="f30k_precomp", seed=0, parts=None, **opt):
    """``{epoch, model: [img_enc, txt_enc, region_loss], best_rsum, opt, Eiters}``; train_SelfAlign.py's options."""
    g = torch.Generator().manual_seed(seed)
    img = {**vsrn_image_state(g, data_name == "f30k_precomp"), **context_head(g)}
    txt = {"embed.weight": rnd(g, vocab_size, W, scale=0.3), "local_fc.weight": rnd(g, E, W, scale=0.3),
           "local_fc.bias": torch.zeros(E), **gru(g, "rnn.", E, E), **context_head(g)}
    lca = {"v_prototypes.weight": F.normalize(rnd(g, K, E), dim=1)}
    o = dict(local_clu_num=K, ctx_relu=1, v5_tao=0.7, v6_tao=0.7, exp_sim=0.5, iters_per_epoch=1133,
             logger_name="runs/flickr", lr_update=10)
    o.update(opt)
    torch.save({"epoch": 30, "model": parts or [img, txt, lca], "best_rsum": 400.0,
                "opt": options(data_name, vocab_size, **o), "Eiters": 9}, path)
    return img, txt, lca


def head(s, avg, feats, relu):
    """CRA sub-module: attended global BN1(ctx_fc(avg)), locals BN2(feats) (+ ReLU), gated fusion; F.normalize'd."""
    glo = bn_eval(avg @ s["ctx_fc.weight"].t() + s["ctx_fc.bias"], s, "ctx_fc_bn1.")
    loc = bn_eval(feats.reshape(-1, E), s, "ctx_fc_bn2.").view_as(feats)
    if relu:
        glo, loc = F.relu(glo), F.relu(loc)
    hidden = F.relu(torch.cat([avg, glo], -1) @ s["fusion_fn.0.weight"].t() + s["fusion_fn.0.bias"])
    gate = torch.sigmoid(hidden @ s["fusion_fn.2.weight"].t() + s["fusion_fn.2.bias"])
    fused = gate * avg + (1 - gate) * glo
    return F.normalize(fused, dim=-1), F.normalize(loc, dim=-1)


def reference_image_embedding(img, feats, relu):
    """encode_data: [img_emb; 0.5 img_ctx_fea; mean over regions of 0.5 img_locals] (forward_emb volatile=True)."""
    r = reference_image(img, feats)
    fused, loc = head(img, r["gcn"].mean(1), r["gcn"], relu)
    return torch.cat([r["emb"], 0.5 * fused, (0.5 * loc).mean(1)], -1)


def reference_caption_embedding(txt, ids, lens, relu):
    """EncoderText: embed -> local_fc -> GRU (pad_packed_sequence: zero states after each caption's end, padded to
    the batch's longest) -> [l2(last state); mean of the locals over ALL positions; fused from the mean over ALL
    positions]."""
    rnn = torch.nn.GRU(E, E, 1, batch_first=True)
    rnn.load_state_dict({k[4:]: t for k, t in txt.items() if k.startswith("rnn.")})
    x = F.embedding(ids, txt["embed.weight"]) @ txt["local_fc.weight"].t() + txt["local_fc.bias"]
    states = rnn(x)[0] * (torch.arange(ids.shape[1])[None, :] < lens[:, None])[..., None]
    last = states[torch.arange(len(lens)), lens - 1]
    fused, loc = head(txt, states.mean(1), states, relu)
    return torch.cat([l2(last, 1), loc.mean(1), fused], -1)


@pytest.mark.parametrize("data_name,relu", [("f30k_precomp", 1), ("coco_precomp", 0)])
def test_the_mapping_is_complete_and_the_embeddings_are_the_references(tmp_path, data_name, relu):
    from itr.checkpoint import load_for_eval

    n = write_vocab(tmp_path / f"{data_name}_vocab.pkl")
    img, txt, lca = selfalign_checkpoint(tmp_path / "model_best.pth.tar", n, data_name, ctx_relu=relu)
    best = import_checkpoint(ImportRequest(tmp_path / "model_best.pth.tar", "selfalign_vsrn", tmp_path / "run",
                                           vocab=tmp_path / f"{data_name}_vocab.pkl"))
    model, tok, recipe, meta = load_for_eval(best)
    m, f30k = recipe.model, data_name == "f30k_precomp"
    assert (m.name, m.fc_norm, m.out_bn, m.caption_weight, m.concept, m.context) == \
        ("selfalign_vsrn", not f30k, f30k, 0, True, True)
    assert (m.prototypes, m.ctx_relu, m.tau_image_locals, m.word_slots) == (K, bool(relu), 0.7, 60)
    assert recipe.data.max_words == 0 and recipe.loss.max_violation and recipe.optim.lr_update == 10
    torch.testing.assert_close(model.lca.prototypes.weight, lca["v_prototypes.weight"])
    torch.testing.assert_close(model.img_ctx.bn_loc.running_mean, img["ctx_fc_bn2.running_mean"])
    torch.testing.assert_close(model.txt_ctx.fusion[2].weight, txt["fusion_fn.2.weight"])
    torch.testing.assert_close(model.txt_enc.local_fc.weight, txt["local_fc.weight"])
    feats = torch.randn(3, R, D)
    ids = torch.tensor([tok.encode("a red dog runs"), tok.encode("the cat on grass")])  # equal lengths: no padding
    lens = torch.tensor([6, 6])
    with torch.no_grad():
        got = model.embed_images({"feats": feats})
        assert got.shape == (3, 3 * E)
        torch.testing.assert_close(got, reference_image_embedding(img, feats, relu), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.embed_captions({"text_ids": ids, "text_lens": lens}),
                                   reference_caption_embedding(txt, ids, lens, relu), rtol=1e-4, atol=1e-5)


def test_padding_is_left_out_of_the_caption_context_where_the_reference_keeps_it(tmp_path):
    """The documented difference: the reference's caption embedding depends on its batch's longest caption."""
    from itr.checkpoint import load_for_eval

    n = write_vocab(tmp_path / "v.pkl")
    _, txt, _ = selfalign_checkpoint(tmp_path / "ck.pth.tar", n)
    model, tok, _, _ = load_for_eval(import_checkpoint(
        ImportRequest(tmp_path / "ck.pth.tar", "selfalign_vsrn", tmp_path / "run", vocab=tmp_path / "v.pkl")))
    short = tok.encode("a dog")
    batch = torch.tensor([short + [0] * 4, tok.encode("the red cat near a bike")[:8]])
    lens, alone = torch.tensor([4, 8]), torch.tensor([short])
    with torch.no_grad():
        padded = model.embed_captions({"text_ids": batch, "text_lens": lens})[0]
        torch.testing.assert_close(padded, model.embed_captions({"text_ids": alone, "text_lens": torch.tensor([4])})[0])
        ref_alone = reference_caption_embedding(txt, alone, torch.tensor([4]), 1)[0]
        ref_padded = reference_caption_embedding(txt, batch, lens, 1)[0]
    torch.testing.assert_close(padded, ref_alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(padded[:E], ref_padded[:E], rtol=1e-4, atol=1e-5)  # the GRU embedding: the same
    assert (padded[E:] - ref_padded[E:]).abs().max() > 1e-3  # the context part: the reference mixes in padding


def test_the_imported_run_evaluates_and_fine_tunes(tmp_path):
    from itr.config import load_recipe
    from itr.data.synthetic import generate
    from itr.eval.job import run_eval
    from itr.train import train

    n = write_vocab(tmp_path / "f30k_precomp_vocab.pkl")
    selfalign_checkpoint(tmp_path / "ck.pth.tar", n)
    best = import_checkpoint(ImportRequest(tmp_path / "ck.pth.tar", "selfalign_vsrn", tmp_path / "run",
                                           vocab=tmp_path / "f30k_precomp_vocab.pkl"))
    data = generate(tmp_path / "data", splits=(("train", 40), ("dev", 10), ("test", 10)), dim=D, regions=R, seed=2)
    assert 0 <= run_eval(best, data, "test")["rsum"] <= 600
    over = tiny_overrides(data, **{"train.epochs": 1, "train.max_steps": 2, "tracking.enabled": "false",
                                   "model.embed_dim": E, "model.text.word_dim": W})
    over.append(f"train.init_from={tmp_path / 'run'}")
    train(load_recipe(best / "recipe.yaml", over), tmp_path / "ft")
    assert (tmp_path / "ft" / "last" / "model.safetensors").is_file()


def test_a_vsrn_checkpoint_a_wrong_shape_and_a_forbidden_global_give_clear_errors(tmp_path):
    n = write_vocab(tmp_path / "v.pkl")
    img, txt, lca = selfalign_checkpoint(tmp_path / "ck.pth.tar", n)
    selfalign_checkpoint(tmp_path / "vsrn.pth.tar", n, parts=[img, txt])
    with pytest.raises(CheckpointError, match=r"vsrn\.pth\.tar: 'model' holds two state dicts .*--from vsrn"):
        import_checkpoint(ImportRequest(tmp_path / "vsrn.pth.tar", "selfalign_vsrn", tmp_path / "run",
                                        vocab=tmp_path / "v.pkl"))
    selfalign_checkpoint(tmp_path / "wide.pth.tar", n, parts=[img, txt, {"v_prototypes.weight": torch.randn(K, E + 1)}])
    with pytest.raises(CheckpointError) as e:
        import_checkpoint(ImportRequest(tmp_path / "wide.pth.tar", "selfalign_vsrn", tmp_path / "run",
                                        vocab=tmp_path / "v.pkl"))
    assert f"lca.prototypes.weight: itr expects ({K}, {E}), the checkpoint has ({K}, {E + 1})" in str(e.value)
    torch.save({"model": [img, txt, lca], "opt": Evil()}, tmp_path / "evil.pth.tar")
    with pytest.raises(CheckpointError, match=r"refusing to unpickle .*evil\.pth\.tar: it needs the global"):
        import_checkpoint(ImportRequest(tmp_path / "evil.pth.tar", "selfalign_vsrn", tmp_path / "run",
                                        vocab=tmp_path / "v.pkl"))
    assert not (tmp_path / "run" / "best").exists()
