import pytest

from itr.config import OptimConfig
from itr.optim import lr_factor


def test_step_decay_as_vsepp():
    cfg = OptimConfig(lr_update=15, lr_decay=0.1)
    assert [lr_factor(cfg, e) for e in (0, 14, 15, 29, 30)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_linear_warmup_then_linear_decay():
    cfg = OptimConfig(schedule="linear", warmup_ratio=0.05)  # xmatching: 5% warm-up, linear decay
    total = 200
    assert lr_factor(cfg, 0, 0, total) == pytest.approx(1 / 10)
    assert lr_factor(cfg, 0, 9, total) == pytest.approx(1.0)
    assert lr_factor(cfg, 0, 10, total) == pytest.approx(1.0)
    assert lr_factor(cfg, 0, 105, total) == pytest.approx(0.5)
    assert lr_factor(cfg, 0, 200, total) == pytest.approx(0.0)


def test_cosine_and_warmup_steps_with_step_decay():
    cfg = OptimConfig(schedule="cosine")
    assert lr_factor(cfg, 0, 0, 100) == pytest.approx(1.0)
    assert lr_factor(cfg, 0, 50, 100) == pytest.approx(0.5)
    cfg = OptimConfig(warmup_steps=4, lr_update=1, lr_decay=0.5)  # TGDT-style iteration warm-up on a step schedule
    assert [lr_factor(cfg, 0, s, 100) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert lr_factor(cfg, 2, 50, 100) == pytest.approx(0.25)


def test_no_decay_groups_as_bert_fine_tuning():
    import torch

    from itr.optim import param_groups

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    groups = {g["name"]: g for g in param_groups(model, 1.0, 0.01, ["bias", "1.weight"])}
    assert groups["model"]["weight_decay"] == 0.01 and len(groups["model"]["params"]) == 1  # 0.weight
    assert groups["model_no_decay"]["weight_decay"] == 0.0 and len(groups["model_no_decay"]["params"]) == 3
