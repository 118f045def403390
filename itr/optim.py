"""Optimizer construction and the step-decay learning-rate schedule.

Implementation choice (``optim.impl``, reported in the log and in MLflow as
``optimizer_impl``): NVIDIA apex's FusedAdam when it imports and a GPU is present,
else torch's ``fused=True`` Adam/AdamW, else ``foreach``. The PyPI package called
``apex`` is an unrelated web library: only ``apex.optimizers.FusedAdam`` counts.
"""
import math

import torch


def _apex_fused_adam():
    try:
        from apex.optimizers import FusedAdam  # type: ignore

        return FusedAdam
    except Exception:
        return None


def param_groups(model, text_lr_mult, weight_decay=0.0, no_decay=()):
    """Groups by learning rate (pretrained text at ``text_lr_mult``) and by weight decay
    (names containing one of ``no_decay`` get none, as BERT fine-tuning does for biases and LayerNorm; nor does
    the InfoNCE temperature ``logit_scale``, as in OpenCLIP)."""
    pretrained = {id(p) for p in getattr(model, "pretrained_parameters", lambda: [])()}
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        pre = id(p) in pretrained
        decay = not any(s in name for s in no_decay) and not name.endswith("logit_scale")  # as OpenCLIP
        key = ("pretrained_text" if pre else "model") + ("" if decay else "_no_decay")
        g = groups.setdefault(key, {"params": [], "lr_mult": text_lr_mult if pre else 1.0, "name": key,
                                    "weight_decay": weight_decay if decay else 0.0})
        g["params"].append(p)
    return [groups[k] for k in ("model", "model_no_decay", "pretrained_text", "pretrained_text_no_decay") if k in groups]


def make_optimizer(model, cfg):
    """Return (optimizer, description of the implementation that runs)."""
    groups = param_groups(model, cfg.text_lr_mult, cfg.weight_decay, cfg.no_decay)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_mult"]
    on_cuda = next(model.parameters()).is_cuda
    impl = cfg.impl
    if impl in ("auto", "apex"):
        fused_adam = _apex_fused_adam() if on_cuda else None
        if fused_adam is not None:
            opt = fused_adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, adam_w_mode=cfg.name == "adamw")
            return opt, f"apex.optimizers.FusedAdam(adam_w_mode={cfg.name == 'adamw'})"
        if impl == "apex":
            from itr.errors import ConfigError

            raise ConfigError("optim.impl=apex but apex.optimizers.FusedAdam does not import (or no GPU); "
                               "install NVIDIA apex from source, or use optim.impl=auto")
        impl = "fused"
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    kw = {"fused": True} if impl == "fused" else {"foreach": True} if impl == "foreach" else {"foreach": False}
    try:
        opt = cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **kw)
    except (RuntimeError, TypeError, ValueError):
        if impl != "fused":
            raise
        kw = {"foreach": True}
        opt = cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **kw)
    return opt, f"torch.optim.{cls.__name__}({', '.join(f'{k}=True' for k, v in kw.items() if v) or 'foreach=False'})"


def lr_factor(cfg, epoch, step=0, total_steps=0):
    """The learning-rate multiplier at optimizer step ``step`` (0-based) of epoch ``epoch``.

    ``step``: VSE++'s step decay, x lr_decay every lr_update epochs. ``linear`` / ``cosine``:
    decay to 0 over ``total_steps`` (BERT-style fine-tuning, xmatching). Any schedule can start
    with a linear warm-up over ``warmup_steps`` optimizer steps (or ``warmup_ratio`` of all steps).
    """
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    if warmup and step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "step":
        return cfg.lr_decay ** (epoch // cfg.lr_update) if cfg.lr_update > 0 else 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def set_lr(optimizer, cfg, epoch, step=0, total_steps=0):
    f = lr_factor(cfg, epoch, step, total_steps)
    for g in optimizer.param_groups:
        g["lr"] = cfg.lr * g.get("lr_mult", 1.0) * f
    return cfg.lr * f
