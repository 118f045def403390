import pytest
import torch

from itr.config import OptimConfig
from itr.errors import ConfigError
from itr.optim import make_optimizer
from itr.precision import Precision


def test_fp16_overflow_is_skipped_and_reported():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    p = Precision("fp16", "cpu")
    before = model.weight.detach().clone()
    with p.autocast():
        y = model(torch.randn(2, 4))
    assert y.dtype == torch.float16
    p.scale(y.float().sum() * 1e30).backward()  # inf gradients at any loss scale
    p.unscale_(opt)
    assert p.step(opt) is True
    assert torch.equal(model.weight, before)  # not applied
    scale = p.scaler.get_scale()
    assert scale == 2.0 ** 15  # halved
    for _ in range(10):  # the scaler keeps halving until the gradients fit in fp16
        opt.zero_grad()
        with p.autocast():
            y = model(torch.randn(2, 4))
        p.scale(y.float().sum()).backward()
        p.unscale_(opt)
        if not p.step(opt):
            break
    assert not torch.equal(model.weight, before) and p.scaler.get_scale() <= scale


def test_bf16_autocast_and_no_scaler():
    p = Precision("bf16", "cpu")
    with p.autocast():
        assert torch.nn.Linear(2, 2)(torch.randn(1, 2)).dtype == torch.bfloat16
    assert p.scaler is None
    assert Precision("fp16", "cpu", deepspeed=True).scaler is None  # DeepSpeed scales its own loss


def test_optimizer_choice_is_reported_and_apex_needs_apex():
    model = torch.nn.Linear(2, 2)
    _, impl = make_optimizer(model, OptimConfig(name="adamw"))
    assert impl == "torch.optim.AdamW(fused=True)"
    _, impl = make_optimizer(model, OptimConfig(impl="foreach"))
    assert impl == "torch.optim.Adam(foreach=True)"
    with pytest.raises(ConfigError, match="apex"):
        make_optimizer(model, OptimConfig(impl="apex"))
