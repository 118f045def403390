"""`itr import --from vsepp`: a checkpoint in fartashf/vsepp's exact layout (random weights, its options object,
its pickled vocabulary) becomes an itr run directory that evaluates and fine-tunes; what the embeddings are is
checked against a forward written out by hand from the checkpoint's tensors. Refusals: a wrong vocabulary
size, a forbidden pickle global in the checkpoint or in the vocabulary."""
import argparse
import json
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from itr.errors import CheckpointError
from itr.imports import ImportRequest, import_checkpoint

from conftest import tiny_overrides

WORDS = ["a", "dog", "cat", "red", "runs", "on", "the", "grass", "near", "bike"]
E, W, D = 16, 8, 32  # embed, word dim, image feature dim


def vocab_module():
    """vsepp's vocab.py, as its pickles name it: a module ``vocab`` with a plain ``Vocabulary``."""
    mod = types.ModuleType("vocab")

    class Vocabulary:
        def __init__(self):
            self.word2idx, self.idx2word, self.idx = {}, {}, 0

        def add_word(self, word):
            if word not in self.word2idx:
                self.word2idx[word], self.idx2word[self.idx] = self.idx, word
                self.idx += 1

    Vocabulary.__module__, Vocabulary.__qualname__ = "vocab", "Vocabulary"
    mod.Vocabulary = Vocabulary
    return mod


def write_vocab(path, words=WORDS, protocol=2):
    mod = vocab_module()
    sys.modules["vocab"] = mod
    try:
        v = mod.Vocabulary()
        for w in ["<pad>", "<start>", "<end>", "<unk>"] + words:
            v.add_word(w)
        path.write_bytes(pickle.dumps(v, protocol=protocol))
    finally:
        del sys.modules["vocab"]
    return len(words) + 4


def vsepp_checkpoint(path, vocab_size, seed=0, **opt):
    """``{epoch, model: [img_enc, txt_enc], best_rsum, opt, Eiters}`` with EncoderImagePrecomp and EncoderText keys."""
    g = torch.Generator().manual_seed(seed)
    img = {"fc.weight": torch.randn(E, D, generator=g) * 0.2, "fc.bias": torch.randn(E, generator=g) * 0.1}
    txt = {"embed.weight": torch.randn(vocab_size, W, generator=g) * 0.1,
           "rnn.weight_ih_l0": torch.randn(3 * E, W, generator=g) * 0.2,
           "rnn.weight_hh_l0": torch.randn(3 * E, E, generator=g) * 0.2,
           "rnn.bias_ih_l0": torch.randn(3 * E, generator=g) * 0.1,
           "rnn.bias_hh_l0": torch.randn(3 * E, generator=g) * 0.1}
    options = dict(data_name="f30k_precomp", margin=0.2, num_epochs=30, batch_size=128, word_dim=W, embed_size=E,
                   grad_clip=2.0, num_layers=1, learning_rate=2e-4, lr_update=15, max_violation=True, img_dim=D,
                   measure="cosine", use_abs=False, no_imgnorm=False, cnn_type="vgg19", vocab_size=vocab_size)
    options.update(opt)
    torch.save({"epoch": 30, "model": [img, txt], "best_rsum": 420.0, "opt": argparse.Namespace(**options),
                "Eiters": 12345}, path)
    return img, txt


@pytest.fixture
def imported(tmp_path):
    n = write_vocab(tmp_path / "f30k_precomp_vocab.pkl")
    img, txt = vsepp_checkpoint(tmp_path / "model_best.pth.tar", n)
    best = import_checkpoint(ImportRequest(tmp_path / "model_best.pth.tar", "vsepp", tmp_path / "run",
                                           vocab=tmp_path / "f30k_precomp_vocab.pkl"))
    return best, img, txt


def test_the_mapping_is_complete_and_the_forward_is_the_references(imported):
    from itr.checkpoint import load_for_eval

    best, img, txt = imported
    model, tok, recipe, meta = load_for_eval(best)
    assert meta["img_dim"] == D and meta["imported"]["family"] == "vsepp" and meta["imported"]["options"]["margin"] == 0.2
    assert recipe.model.name == "vsepp" and recipe.model.embed_dim == E and recipe.loss.max_violation
    assert recipe.data.name == "f30k" and recipe.optim.lr_update == 15 and recipe.loss.mask_same_image is False
    torch.testing.assert_close(model.img_enc.fc.weight, img["fc.weight"])
    torch.testing.assert_close(model.txt_enc.rnn.weight_hh_l0, txt["rnn.weight_hh_l0"])
    feats = torch.randn(3, 1, D)
    with torch.no_grad():
        got = model.embed_images({"feats": feats})
        ref = feats[:, 0] @ img["fc.weight"].t() + img["fc.bias"]  # EncoderImagePrecomp: fc, then l2norm
        torch.testing.assert_close(got, ref / ref.norm(dim=1, keepdim=True))
        ids = torch.tensor([tok.encode("a red dog runs") + [0], tok.encode("the cat near a bike")])
        assert ids[0].tolist() == [1, 4, 7, 5, 8, 2, 0]  # <start> a red dog runs <end> <pad>, vsepp's ids
        got = model.embed_captions({"text_ids": ids, "text_lens": torch.tensor([6, 7])})
        gru = torch.nn.GRU(W, E, 1, batch_first=True)  # EncoderText: embed -> GRU -> the last step -> l2norm
        gru.load_state_dict({k[4:]: v for k, v in txt.items() if k.startswith("rnn.")})
        out, _ = gru(torch.nn.functional.embedding(ids, txt["embed.weight"]))
        last = torch.stack([out[0, 5], out[1, 6]])
        torch.testing.assert_close(got, last / last.norm(dim=1, keepdim=True))


def test_the_imported_run_evaluates_and_fine_tunes(imported, tmp_path):
    from itr.config import load_recipe
    from itr.data.synthetic import generate
    from itr.eval.job import run_eval
    from itr.train import train
    from safetensors.torch import load_file

    best, _, _ = imported
    data = generate(tmp_path / "data", splits=(("train", 40), ("dev", 10), ("test", 10)), dim=D, regions=1, seed=2)
    m = run_eval(best, data, "test")
    assert 0 <= m["rsum"] <= 600
    over = tiny_overrides(data, **{"train.epochs": 1, "optim.lr": 0.0, "tracking.enabled": "false",
                                   "model.embed_dim": E, "model.text.word_dim": W}) + [f"train.init_from={tmp_path / 'run'}"]
    train(load_recipe(best / "recipe.yaml", over), tmp_path / "ft")
    a, b = load_file(str(best / "model.safetensors")), load_file(str(tmp_path / "ft" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # lr 0: the imported weights, kept
    assert json.loads((tmp_path / "ft" / "last" / "vocab.json").read_text())["word2idx"]["dog"] == 5  # its vocabulary


def test_a_json_vocabulary_and_a_protocol_0_pickle_read_the_same(tmp_path):
    from itr.imports.safe import read_vocab

    write_vocab(tmp_path / "v2.pkl")
    write_vocab(tmp_path / "v0.pkl", protocol=0)  # Python 2's default: copy_reg._reconstructor
    words = ["<pad>", "<start>", "<end>", "<unk>"] + WORDS
    (tmp_path / "v.json").write_text(json.dumps({"word2idx": {w: i for i, w in enumerate(words)},
                                                 "idx2word": {str(i): w for i, w in enumerate(words)}, "idx": len(words)}))
    assert read_vocab(tmp_path / "v2.pkl").idx2word == read_vocab(tmp_path / "v0.pkl").idx2word == words
    assert read_vocab(tmp_path / "v.json").idx2word == words


def test_a_vocabulary_of_another_size_is_a_clear_shape_error(tmp_path):
    write_vocab(tmp_path / "small.pkl", WORDS[:6])
    vsepp_checkpoint(tmp_path / "ck.pth.tar", len(WORDS) + 4)
    with pytest.raises(CheckpointError) as e:
        import_checkpoint(ImportRequest(tmp_path / "ck.pth.tar", "vsepp", tmp_path / "run", vocab=tmp_path / "small.pkl"))
    msg = str(e.value)
    assert "txt_enc.embed.weight: itr expects (10, 8), the checkpoint has (14, 8)" in msg and "--vocab" in msg
    assert not (tmp_path / "run" / "best").exists()


class Evil:
    def __reduce__(self):
        return (open, ("/tmp/itr-import-ran", "w"))


def test_forbidden_pickle_globals_are_refused_naming_the_file(tmp_path):
    n = write_vocab(tmp_path / "v.pkl")
    img, txt = vsepp_checkpoint(tmp_path / "ok.pth.tar", n)
    torch.save({"model": [img, txt], "opt": Evil()}, tmp_path / "evil.pth.tar")
    with pytest.raises(CheckpointError, match=r"refusing to unpickle .*evil\.pth\.tar: it needs the global"):
        import_checkpoint(ImportRequest(tmp_path / "evil.pth.tar", "vsepp", tmp_path / "run", vocab=tmp_path / "v.pkl"))
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match=r"refusing to unpickle .*evil\.pkl"):
        import_checkpoint(ImportRequest(tmp_path / "ok.pth.tar", "vsepp", tmp_path / "run", vocab=tmp_path / "evil.pkl"))
    assert not (tmp_path / "run" / "best").exists()
    np.testing.assert_equal(__import__("os").path.exists("/tmp/itr-import-ran"), False)


def test_the_cli_names_the_missing_vocabulary(tmp_path, capsys):
    from itr.cli import main

    vsepp_checkpoint(tmp_path / "ck.pth.tar", 14)
    assert main(["import", str(tmp_path / "ck.pth.tar"), "--from", "vsepp", "--out", str(tmp_path / "run")]) == 2
    assert "--vocab VOCAB" in capsys.readouterr().err
