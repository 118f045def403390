"""`itr import --from vse_infty`: checkpoints in woodfrog/vse_infty's exact layouts (master: BUTD regions + BERT,
DataParallel ``module.`` keys, BERT's pooler and position-id buffer, the MLP's unused last BatchNorm; bigru:
BUTD regions + BiGRU over SCAN's JSON vocabulary plus ``<mask>``), random weights and their options objects,
become itr run directories that evaluate; the embeddings are checked against a forward written out by hand
from the checkpoint's tensors (FC + MLP with BatchNorm running statistics, GPO, BERT / BiGRU). Refusals: grid
models, unnormalized embeddings, a vocabulary of another size, an unknown key, a forbidden pickle global."""
import argparse
import json
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from itr.errors import CheckpointError
from itr.imports import ImportRequest, import_checkpoint

from conftest import tiny_overrides

E, D, R = 16, 12, 5  # embed, image feature dim, regions
WORDS = ["a", "dog", "cat", "red", "runs", "on", "the", "grass", "near", "bike"]


def randomized(module, g, prefix):
    """``module``'s state dict under ``prefix`` with random values (BatchNorm: positive variances, a counter)."""
    out = {}
    for k, v in module.state_dict().items():
        if k.endswith("num_batches_tracked"):
            out[prefix + k] = torch.tensor(1000)
        elif k.endswith("running_var"):
            out[prefix + k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            out[prefix + k] = torch.randn(v.shape, generator=g) * 0.3
    return out


def gpo_state(g, prefix):
    """lib/modules/aggr/gpo.py GPO(32, 32): a bidirectional GRU over position encodings and a linear score."""
    return {**randomized(torch.nn.GRU(32, 32, 1, batch_first=True, bidirectional=True), g, prefix + "gru."),
            prefix + "linear.weight": torch.randn(1, 32, generator=g) * 0.3}


def mlp_state(g, prefix, in_dim):
    """lib/modules/mlp.py MLP(in, embed // 2, embed, 2): two Linear layers and two BatchNorms (bns.1 unused)."""
    out = {**randomized(torch.nn.Linear(in_dim, E // 2), g, prefix + "layers.0."),
           **randomized(torch.nn.Linear(E // 2, E), g, prefix + "layers.1.")}
    out.update(randomized(torch.nn.BatchNorm1d(E // 2), g, prefix + "bns.0."))
    out.update(randomized(torch.nn.BatchNorm1d(E), g, prefix + "bns.1."))
    return out


def bert_state(bert_dir, seed, prefix="bert."):
    """``BertModel.from_pretrained`` as saved by transformers 3-4.30: pooler and ``embeddings.position_ids``."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig.from_pretrained(bert_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bert = BertModel(cfg)  # with its pooler
    out = {prefix + k: v for k, v in bert.state_dict().items()}
    out[prefix + "embeddings.position_ids"] = torch.arange(cfg.max_position_embeddings)[None]
    return out, cfg


def options(**over):
    """arguments.py@ee9d7d0 (master) as train_region.sh@da61e13 sets it; train.py adds vocab_size."""
    opt = dict(data_path="/tmp/data/f30k", data_name="f30k", vocab_path="./vocab/", margin=0.2, num_epochs=25,
               batch_size=128, word_dim=300, embed_size=E, grad_clip=2.0, learning_rate=5e-4, lr_update=15,
               optim="adam", workers=10, log_step=200, val_step=500, logger_name="runs/f30k_butd_region_bert/log",
               model_name="runs/f30k_butd_region_bert", resume="", max_violation=True, img_dim=D, no_imgnorm=False,
               no_txtnorm=False, precomp_enc_type="basic", backbone_path="", backbone_source="detector",
               vse_mean_warmup_epochs=1, reset_start_epoch=False, backbone_warmup_epochs=5,
               embedding_warmup_epochs=2, backbone_lr_factor=0.01, input_scale_factor=1, vocab_size=30522)
    opt.update(over)
    return argparse.Namespace(**opt)


def image_state(g):
    """EncoderImageAggr (lib/encoders.py@c9943b2): fc, the MLP residual, GPO."""
    return {"fc.weight": torch.randn(E, D, generator=g) * 0.3, "fc.bias": torch.randn(E, generator=g) * 0.1,
            **mlp_state(g, "mlp.", D), **gpo_state(g, "gpool.")}


def state_dict(d, prefix=""):
    """What ``nn.Module.state_dict()`` returns: an OrderedDict carrying ``_metadata``."""
    out = OrderedDict((prefix + k, v) for k, v in d.items())
    out._metadata = OrderedDict({"": {"version": 1}})
    return out


def save(path, img, txt, opt, parallel):
    """train.py save_checkpoint; master's train.py calls make_data_parallel() first: ``module.`` keys."""
    model = [state_dict(s, "module." if parallel else "") for s in (img, txt)]
    torch.save({"epoch": 25, "model": model, "best_rsum": 510.0, "opt": opt, "Eiters": 28000}, path)


def bert_checkpoint(path, bert_dir, seed=0, parallel=True, **opt):
    g = torch.Generator().manual_seed(seed)
    img = image_state(g)
    bert, cfg = bert_state(bert_dir, seed + 1)
    txt = {**bert, "linear.weight": torch.randn(E, cfg.hidden_size, generator=g) * 0.3,
           "linear.bias": torch.randn(E, generator=g) * 0.1, **gpo_state(g, "gpool.")}
    save(path, img, txt, options(vocab_size=cfg.vocab_size, **opt), parallel)
    return img, txt


def write_vocab(path, words=WORDS):
    """SCAN's vocab/f30k_precomp_vocab.json (lib/vocab.py serialize_vocab)."""
    words = ["<pad>", "<start>", "<end>", "<unk>"] + words
    path.write_text(json.dumps({"word2idx": {w: i for i, w in enumerate(words)},
                                "idx2word": {str(i): w for i, w in enumerate(words)}, "idx": len(words)}))
    return len(words)


def bigru_checkpoint(path, n_words, seed=0, W=8):
    """The bigru branch's EncoderText (lib/encoders.py@35035a0): vocab + <mask> rows, BiGRU, GPO; no module."""
    g = torch.Generator().manual_seed(seed)
    img = image_state(g)
    txt = {"embed.weight": torch.randn(n_words + 1, W, generator=g) * 0.3,
           **randomized(torch.nn.GRU(W, E, 1, batch_first=True, bidirectional=True), g, "rnn."),
           **gpo_state(g, "gpool.")}
    save(path, img, txt, options(word_dim=W, num_layers=1, drop=True, vocab_size=n_words + 1), parallel=False)
    return img, txt


# ----------------------------------------------------------------------------- the reference forward, by hand


def ref_gpo(feats, lens, state, prefix):
    """gpo.py: per sample, softmax(linear(mean of the BiGRU directions over sin/cos encodings) / 0.1) weights
    the features sorted per dimension in descending order."""
    gru = torch.nn.GRU(32, 32, 1, batch_first=True, bidirectional=True)
    gru.load_state_dict({k[len(prefix) + 4:]: v for k, v in state.items() if k.startswith(prefix + "gru.")})
    out = []
    for x, n in zip(feats, lens.tolist()):
        pos = torch.arange(n, dtype=torch.float)[:, None]
        div = torch.exp(torch.arange(0, 32, 2, dtype=torch.float) * -(math.log(10000.0) / 32))
        pe = torch.stack([torch.sin(pos * div), torch.cos(pos * div)], dim=2).reshape(n, 32)
        h, _ = gru(pe[None])
        score = ((h[0, :, :32] + h[0, :, 32:]) / 2) @ state[prefix + "linear.weight"].t()
        out.append((x[:n].sort(dim=0, descending=True).values * torch.softmax(score / 0.1, dim=0)).sum(0))
    return torch.stack(out)


def ref_fc_mlp(feats, st, fc="fc.", mlp="mlp."):
    """fc(x) + MLP(x): Linear, BatchNorm (running statistics, eval), ReLU, Linear, over every region."""
    def linear(x, p):
        return F.linear(x, st[p + "weight"], st[p + "bias"])

    x = feats.reshape(-1, feats.shape[-1])
    b = mlp + "bns.0."
    h = F.relu(F.batch_norm(linear(x, mlp + "layers.0."), st[b + "running_mean"], st[b + "running_var"],
                            st[b + "weight"], st[b + "bias"]))
    return (linear(h, mlp + "layers.1.") + linear(x, fc)).reshape(*feats.shape[:2], -1)


def ref_image(feats, img):
    """EncoderImageAggr.forward: fc(x) + MLP(x), GPO over all regions, l2norm."""
    pooled = ref_gpo(ref_fc_mlp(feats, img), torch.full((feats.shape[0],), feats.shape[1]), img, "gpool.")
    return pooled / pooled.norm(dim=1, keepdim=True)


def ref_bert_tokens(ids, txt, cfg, prefix="bert."):
    """BertModel(x, attention_mask=(x != 0))[0], with the checkpoint's weights (pooler included)."""
    from transformers import BertModel

    bert = BertModel(cfg).eval()
    bert.load_state_dict({k[len(prefix):]: v for k, v in txt.items() if k.startswith(prefix)}, strict=False)
    return bert(ids, attention_mask=(ids != 0).float()).last_hidden_state


# ----------------------------------------------------------------------------- tests


@pytest.fixture
def bert_import(tmp_path, tiny_bert):
    img, txt = bert_checkpoint(tmp_path / "model_best.pth", tiny_bert)
    best = import_checkpoint(ImportRequest(tmp_path / "model_best.pth", "vse_infty", tmp_path / "run", bert=tiny_bert))
    return best, img, txt


def test_the_bert_region_model_maps_completely_and_forwards_as_the_reference(bert_import, tiny_bert):
    from transformers import BertConfig

    from itr.checkpoint import load_for_eval

    best, img, txt = bert_import
    model, tok, recipe, meta = load_for_eval(best)
    assert meta["img_dim"] == D and meta["imported"]["family"] == "vse_infty"
    assert recipe.model.name == "vse_infty" and recipe.model.text.name == "hf_words" and recipe.model.embed_dim == E
    assert (recipe.data.name, recipe.eval.protocol, recipe.loss.warmup_epochs) == ("f30k", "1k", 1)
    assert (recipe.optim.weight_decay, recipe.optim.text_lr_mult, recipe.optim.lr) == (1e-4, 0.1, 5e-4)
    torch.testing.assert_close(model.img_fc.mlp.bns[0].running_var, img["mlp.bns.0.running_var"])
    torch.testing.assert_close(model.img_pool.gru.weight_hh_l0_reverse, img["gpool.gru.weight_hh_l0_reverse"])
    torch.testing.assert_close(model.txt_enc.backbone.encoder.layer[1].output.dense.weight,
                               txt["bert.encoder.layer.1.output.dense.weight"])
    torch.testing.assert_close(model.txt_enc.proj.weight, txt["linear.weight"])
    feats = torch.randn(3, R, D)
    caps = ["a red dog runs on the grass", "a cat"]
    ids = [tok.encode(c) for c in caps]
    padded = torch.tensor([i + [0] * (len(ids[0]) - len(i)) for i in ids])
    with torch.no_grad():
        torch.testing.assert_close(model.embed_images({"feats": feats}), ref_image(feats, img))
        got = model.embed_captions({"text_ids": padded, "text_lens": torch.tensor([len(i) for i in ids])})
        words = F.linear(ref_bert_tokens(padded, txt, BertConfig.from_pretrained(tiny_bert)), txt["linear.weight"],
                         txt["linear.bias"])
        ref = ref_gpo(words, torch.tensor([len(i) for i in ids]), txt, "gpool.")
        torch.testing.assert_close(got, ref / ref.norm(dim=1, keepdim=True))


def test_the_bert_region_import_evaluates(bert_import, tmp_path):
    from itr.data.synthetic import generate
    from itr.eval.job import run_eval

    data = generate(tmp_path / "data", splits=(("test", 10),), dim=D, regions=R, seed=3)
    m = run_eval(bert_import[0], data, "test")
    assert 0 <= m["rsum"] <= 600


def test_the_bigru_model_reads_scan_vocabulary_plus_mask_and_forwards_as_the_reference(tmp_path):
    from itr.checkpoint import load_for_eval
    from itr.config import load_recipe
    from itr.data.synthetic import generate
    from itr.eval.job import run_eval
    from itr.train import train

    n = write_vocab(tmp_path / "f30k_precomp_vocab.json")
    img, txt = bigru_checkpoint(tmp_path / "model_best.pth", n)
    best = import_checkpoint(ImportRequest(tmp_path / "model_best.pth", "vse_infty", tmp_path / "run",
                                           vocab=tmp_path / "f30k_precomp_vocab.json"))
    model, tok, recipe, _ = load_for_eval(best)
    assert recipe.model.text.name == "gru_words" and recipe.model.text.word_dim == 8
    assert (recipe.optim.weight_decay, recipe.optim.text_lr_mult) == (0.01, 1.0)
    assert tok.idx2word[-1] == "<mask>" and len(tok) == n + 1  # train.py@35035a0: vocab.add_word('<mask>')
    ids = torch.tensor([tok.encode("a red dog runs") + [0], tok.encode("the cat near a bike")])
    assert ids[0].tolist() == [1, 4, 7, 5, 8, 2, 0]  # <start> a red dog runs <end> <pad>, SCAN's ids
    with torch.no_grad():
        got = model.embed_captions({"text_ids": ids, "text_lens": torch.tensor([6, 7])})
        gru = torch.nn.GRU(8, E, 1, batch_first=True, bidirectional=True)  # EncoderText: embed -> BiGRU
        gru.load_state_dict({k[4:]: v for k, v in txt.items() if k.startswith("rnn.")})
        words = torch.zeros(2, 7, E)
        for i, n in enumerate([6, 7]):  # each caption alone, unpadded; the two directions averaged
            out, _ = gru(F.embedding(ids[i:i + 1, :n], txt["embed.weight"]))
            words[i, :n] = (out[0, :, :E] + out[0, :, E:]) / 2
        ref = ref_gpo(words, torch.tensor([6, 7]), txt, "gpool.")
        torch.testing.assert_close(got, ref / ref.norm(dim=1, keepdim=True))
        feats = torch.randn(2, R, D)
        torch.testing.assert_close(model.embed_images({"feats": feats}), ref_image(feats, img))
    data = generate(tmp_path / "data", splits=(("train", 40), ("dev", 10), ("test", 10)), dim=D, regions=R, seed=2)
    assert 0 <= run_eval(best, data, "test")["rsum"] <= 600
    over = tiny_overrides(data, **{"train.epochs": 1, "optim.lr": 0.0, "tracking.enabled": "false",
                                   "model.embed_dim": E, "model.text.word_dim": 8})
    over.append(f"train.init_from={tmp_path / 'run'}")
    train(load_recipe(best / "recipe.yaml", over), tmp_path / "ft")  # fine-tunes from the imported run


def test_a_coco_checkpoint_reads_as_coco_5fold_on_testall(tmp_path, tiny_bert):
    from itr.imports import vse_infty

    for over in ({"data_name": "coco"}, {"data_name": "precomp", "data_path": "/tmp/data/coco"}):
        bert_checkpoint(tmp_path / "ck.pth", tiny_bert, **over)  # the second: arguments.py's default data_name
        ckpt = torch.load(tmp_path / "ck.pth", weights_only=False)
        conv = vse_infty.convert(ckpt, vars(ckpt["opt"]), ImportRequest(tmp_path / "ck.pth", "vse_infty", tmp_path))
        assert conv["recipe"]["data"] == {"name": "coco", "root": "data/coco_precomp", "test_split": "testall"}
        assert conv["recipe"]["eval"]["protocol"] == "coco-5fold"


@pytest.mark.parametrize("case", ["grid", "no_imgnorm", "vocab", "extra_key", "no_bert_dir"])
def test_what_itr_cannot_represent_is_a_clear_error(tmp_path, tiny_bert, capsys, case):
    req = dict(ckpt=tmp_path / "ck.pth", family="vse_infty", out=tmp_path / "run", bert=tiny_bert)
    if case == "grid":  # precomp_enc_type backbone: EncoderImageFull
        g = torch.Generator().manual_seed(0)
        img = {"image_encoder." + k: v for k, v in image_state(g).items()}
        img["backbone.base.conv1.weight"] = torch.zeros(2)
        save(tmp_path / "ck.pth", img, bert_state(tiny_bert, 0)[0], options(precomp_enc_type="backbone"), True)
        expect = r"grid-feature model .*precomp_enc_type=backbone"
    elif case == "no_imgnorm":
        bert_checkpoint(tmp_path / "ck.pth", tiny_bert, no_imgnorm=True)
        expect = r"--no_imgnorm; itr's model L2-normalizes"
    elif case == "vocab":
        bigru_checkpoint(tmp_path / "ck.pth", write_vocab(tmp_path / "v.json"))
        write_vocab(tmp_path / "small.json", WORDS[:5])
        req.update(vocab=tmp_path / "small.json")
        expect = r"txt_enc\.embed\.weight: itr expects \(10, 8\), the checkpoint has \(15, 8\).*--vocab"
    elif case == "extra_key":
        img, txt = bert_checkpoint(tmp_path / "ck.pth", tiny_bert)
        save(tmp_path / "ck.pth", img, {**txt, "fc_extra.weight": torch.zeros(2)}, options(), True)
        expect = r"1 unexpected: \['model\[1\]:fc_extra\.weight'\]"
    else:
        from itr.cli import main

        bert_checkpoint(tmp_path / "ck.pth", tiny_bert)
        assert main(["import", str(tmp_path / "ck.pth"), "--from", "vse_infty", "--out", str(tmp_path / "run")]) == 2
        assert "pass --bert BERT_DIR" in capsys.readouterr().err
        return
    with pytest.raises(CheckpointError, match=expect):
        import_checkpoint(ImportRequest(**req))
    assert not (tmp_path / "run" / "best").exists()


class Evil:
    def __reduce__(self):
        return (print, ("itr-import-ran",))


def test_a_forbidden_pickle_global_is_refused_naming_the_file(tmp_path, tiny_bert, capsys):
    img, txt = bert_checkpoint(tmp_path / "ok.pth", tiny_bert)
    torch.save({"model": [img, txt], "opt": options(), "extra": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"refusing to unpickle .*evil\.pth: it needs the global"):
        import_checkpoint(ImportRequest(tmp_path / "evil.pth", "vse_infty", tmp_path / "run", bert=tiny_bert))
    assert "itr-import-ran" not in capsys.readouterr().out and not (tmp_path / "run" / "best").exists()
