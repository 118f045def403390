"""Training aids: the EMA of the weights, early stopping, head dropout / MLP heads, frozen-feature text encoders."""
import pytest
import torch
from safetensors.torch import load_file

from itr.aids import WeightEMA
from itr.checkpoint import read_meta
from itr.config import ConfigError, load_recipe

from conftest import ROOT, small_overrides

VSEPP = ROOT / "recipes" / "synthetic" / "vsepp_gru.yaml"


def test_ema_is_the_moving_average_and_swaps_back():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    w0 = net[0].weight.detach().clone()
    ema = WeightEMA(net, 0.9)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema.update(net)
    torch.testing.assert_close(ema.shadow["0.weight"], w0 + 0.1)  # 0.9 * w0 + 0.1 * (w0 + 1)
    assert "1.num_batches_tracked" not in ema.shadow  # integers are not averaged
    with ema.applied(net):
        torch.testing.assert_close(net[0].weight, w0 + 0.1)
    torch.testing.assert_close(net[0].weight, w0 + 1.0)  # the model's own weights are back


@pytest.mark.slow
def test_ema_best_checkpoint_and_resume_are_exact(small_shards, tmp_path, monkeypatch):
    """An EMA run writes DIR/best_ema and tests it; stopped mid-epoch 2 and resumed, its EMA state, best_ema
    and every result equal the uninterrupted run's (the EMA is part of DIR/last)."""
    from itr.train import train

    over = small_overrides(small_shards, **{"train.ema_decay": 0.9})
    ref = train(load_recipe(VSEPP, over), tmp_path / "ref")
    assert {"test", "test_ema"} <= ref.keys() and ref["test_ema"] != ref["test"]
    meta = read_meta(tmp_path / "ref" / "best_ema")
    assert meta["train_state"]["global_step"] == meta["train_state"]["ema_best_step"]
    monkeypatch.setenv("ITR_FAULT", "term@step 13")
    assert train(load_recipe(VSEPP, over), tmp_path / "cut") is None
    monkeypatch.delenv("ITR_FAULT")
    res = train(load_recipe(VSEPP, over + ["train.resume=latest"]), tmp_path / "cut")
    for ck, name in (("last", "ema.safetensors"), ("best_ema", "model.safetensors"), ("best", "model.safetensors")):
        a, b = load_file(str(tmp_path / "ref" / ck / name)), load_file(str(tmp_path / "cut" / ck / name))
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a), f"{ck}/{name} differs"
    assert res == ref
    # the EMA weights really differ from the model's
    last = tmp_path / "ref" / "last"
    w, e = load_file(str(last / "model.safetensors")), load_file(str(last / "ema.safetensors"))
    assert not torch.equal(w["img_enc.fc.weight"], e["img_enc.fc.weight"])
    # resuming an EMA checkpoint without the EMA state is refused
    (tmp_path / "cut" / "last" / "ema.safetensors").unlink()
    with pytest.raises(Exception, match="ema.safetensors"):
        train(load_recipe(VSEPP, over + ["train.resume=latest", "train.epochs=3"]), tmp_path / "cut")


def test_early_stopping_counts_epochs_since_the_best_of_model_or_ema():
    from itr.aids import Aids
    from itr.config import TrainConfig
    from itr.train_state import TrainState

    aids = Aids(TrainConfig(patience=2), "rsum")
    s = TrainState(epoch=3, best_epoch=1)
    assert aids.stale_epochs(s) == 2 and aids.stop_early(s, "cpu")
    s.ema_best_epoch = 2  # the EMA improved later: one stale epoch only
    assert aids.stale_epochs(s) == 1 and not aids.stop_early(s, "cpu")
    assert not Aids(TrainConfig(patience=0), "rsum").stop_early(TrainState(epoch=9, best_epoch=1), "cpu")
    assert not aids.stop_early(TrainState(epoch=3), "cpu")  # no dev score yet


@pytest.mark.slow
def test_early_stopping_on_dev_rsum_and_resume(small_shards, tmp_path):
    """lr 0: dev never improves after epoch 1, so patience 1 stops after epoch 2 of 6; a resumed run stays
    stopped (the decision is a function of the saved state)."""
    from itr.train import train

    over = small_overrides(small_shards, **{"optim.lr": 0.0, "train.epochs": 6, "train.patience": 1})
    res = train(load_recipe(VSEPP, over), tmp_path / "run")
    state = read_meta(tmp_path / "run" / "last")["train_state"]
    assert (state["epoch"], state["best_epoch"], res["best_epoch"]) == (2, 1, 1)
    again = train(load_recipe(VSEPP, over + ["train.resume=latest"]), tmp_path / "run")
    assert read_meta(tmp_path / "run" / "last")["train_state"]["epoch"] == 2 and again["test"] == res["test"]


def _vsepp(**over):
    from itr.models import build_model, make_tokenizer

    recipe = load_recipe(raw={"model": {"name": "vsepp", "embed_dim": 8, **over}})
    return build_model(recipe, 6, make_tokenizer(recipe, captions=["a dog", "a cat"]))


def test_mlp_head_and_head_dropout_on_precomputed_features():
    model = _vsepp(image={"name": "precomp", "head": "mlp", "head_hidden": 5, "dropout": 0.5},
                   text={"name": "gru", "word_dim": 4, "min_count": 1})
    assert model.img_enc.fc.out_features == 5 and model.img_enc.fc2[-1].out_features == 8
    x = torch.randn(4, 2, 6)
    model.train()
    assert not torch.equal(model.embed_images({"feats": x}), model.embed_images({"feats": x}))  # dropout on
    model.eval()
    assert torch.equal(model.embed_images({"feats": x}), model.embed_images({"feats": x}))


def test_frozen_features_text_encoder(tiny_bert):
    with pytest.raises(ConfigError, match="frozen_features needs model.text.freeze"):
        _vsepp(text={"name": "hf", "path": str(tiny_bert), "frozen_features": True})
    model = _vsepp(text={"name": "hf", "path": str(tiny_bert), "freeze": True, "frozen_features": True,
                         "head": "mlp", "head_hidden": 6, "dropout": 0.2})
    model.train()
    enc = model.txt_enc
    assert not enc.backbone.training and enc.proj.training  # fixed features: the backbone's dropout is off
    ids, lens = torch.tensor([[2, 7, 8, 3], [2, 9, 3, 0]]), torch.tensor([4, 3])
    out = enc(ids, lens)
    assert out.shape == (2, 8)
    out.sum().backward()
    assert all(p.grad is None for p in enc.backbone.parameters())
    assert enc.proj.weight.grad is not None and enc.proj2[-1].weight.grad is not None
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("txt_enc.backbone") for n in trainable)
