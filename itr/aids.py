"""Training aids for small data: an exponential moving average of the weights, and early stopping on dev.

``train.ema_decay`` > 0 keeps an EMA of every floating-point entry of the model's state dict (parameters and
BatchNorm statistics, as timm's ModelEmaV2), updated after each optimizer step. Its state is part of ``DIR/last``
(``ema.safetensors``), so a resumed run continues the same average; after each epoch it is evaluated on dev
(``dev_ema_*`` in MLflow) and its best is promoted to ``DIR/best_ema``, a checkpoint of its own (``itr eval
DIR/best_ema``), tested at the end beside ``DIR/best``.

``train.patience`` > 0 stops training once that many epochs passed without a new best dev score (of the model
or of its EMA). The decision is a function of the saved training state, so a resumed run stops where the
uninterrupted one would have.
"""
import json
from contextlib import contextmanager

import torch
from tqdm import tqdm

from itr import checkpoint as ckpt
from itr.distributed import all_reduce_sum
from itr.eval.job import final_test
from itr.eval.metrics import format_table
from itr.tracking.names import family_metrics
from itr.errors import CheckpointError, ConfigError

EMA_FILE, BEST_EMA = "ema.safetensors", "best_ema"


class WeightEMA:
    """The average ``ema = decay * ema + (1 - decay) * w`` of a model's floating-point state, in fp32."""

    def __init__(self, model, decay):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model):
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1.0 - self.decay)

    def load(self, state, where):
        if state.keys() != self.shadow.keys():
            raise CheckpointError(f"{where} does not match the model: keys differ "
                                  f"({sorted(state.keys() ^ self.shadow.keys())[:5]})")
        for k, v in state.items():
            self.shadow[k].copy_(v)

    @contextmanager
    @torch.no_grad()
    def applied(self, model):
        """The model with the averaged weights inside the block, its own weights restored after it."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield model
        finally:
            model.load_state_dict(own, strict=False)


class Aids:
    """What the trainer asks of the aids: set up, resume, update per step, evaluate per epoch, stop, test."""

    def __init__(self, train_cfg, best_metric, deepspeed_config=None):
        self.decay, self.patience, self.best_metric = train_cfg.ema_decay, train_cfg.patience, best_metric
        zero = (deepspeed_config or {}).get("zero_optimization", {}).get("stage", 0)
        if self.decay and zero == 3:
            raise ConfigError("train.ema_decay needs whole weights on every rank; ZeRO-3 partitions them "
                              "(use ZeRO-1/2 or DDP)")
        self.ema = None

    def setup(self, model):
        if self.decay:
            self.ema = WeightEMA(model, self.decay)

    def resume(self, resume_from):
        if self.ema is None:
            return
        path = resume_from / EMA_FILE
        if not path.is_file():
            raise CheckpointError(f"{resume_from} has no {EMA_FILE}: it was written without train.ema_decay; resume "
                                  f"it with train.ema_decay=0, or start a new run from it with train.init_from")
        self.ema.load(ckpt.read_weights(path), path)

    def after_step(self, model):
        """After each optimizer step: the model's own constraints (the InfoNCE temperature's clamp), the EMA."""
        model.after_optimizer_step()
        if self.ema is not None:
            self.ema.update(model)

    def files(self):
        """Extra files for ``DIR/last``: name -> state dict."""
        return {EMA_FILE: self.ema.shadow} if self.ema is not None else {}

    def evaluate(self, model, evaluate, state, label):
        """The EMA's dev metrics (``evaluate(model)``: the metrics on rank 0, None elsewhere), its best recorded
        in ``state``; returns (metrics, improved), (None, False) without EMA or off rank 0."""
        if self.ema is None:
            return None, False
        with self.ema.applied(model):
            metrics = evaluate(model)
        if metrics is None:
            return None, False
        score = metrics[self.best_metric]
        improved = state.ema_best is None or score > state.ema_best
        if improved:
            state.ema_best, state.ema_best_epoch, state.ema_best_step = score, label, state.global_step
            state.ema_best_dev = metrics
        return metrics, improved

    def stale_epochs(self, state):
        """Epochs since the last best dev score (model or EMA); None before any (rank 0's state)."""
        if state.best_epoch is None:
            return None
        return state.epoch - max(state.best_epoch, state.ema_best_epoch or 0)

    def report(self, metrics, tracker, state, label):
        """The EMA's dev metrics to MLflow (``dev_ema/*``, at the optimizer step as ``dev/*``) and the console."""
        if metrics is None:
            return
        tracker.log_metrics(family_metrics("dev_ema", metrics), step=state.global_step)
        tqdm.write(format_table(metrics, f"dev, EMA of the weights (best {self.best_metric} {state.ema_best:.1f} at "
                                         f"epoch {state.ema_best_epoch})"))

    def stop_early(self, state, device, say=print):
        """True on every rank once ``patience`` epochs passed without a new best (rank 0 keeps the scores)."""
        if not self.patience:
            return False
        stale = self.stale_epochs(state)
        flag = torch.tensor([1.0 if stale is not None and stale >= self.patience else 0.0], device=device)
        stop = bool(all_reduce_sum(flag).item() > 0)
        if stop:
            say(f"early stop after epoch {state.epoch}: no better dev {self.best_metric} for {self.patience} epochs")
        return stop

    def test(self, recipe, out, device, rank, world, tracker, step):
        """``DIR/best_ema`` on the test split beside ``DIR/best`` (collective): {"test_ema": metrics} on rank 0."""
        if self.ema is None or not (out / BEST_EMA).exists():
            return {}
        metrics = final_test(recipe, out, device, rank, world, BEST_EMA)
        if rank != 0 or metrics is None:
            return {}
        tracker.log_metrics(family_metrics("test_ema", metrics), step=step)
        print(format_table(metrics, f"test ({recipe.data.test_split}) with the best EMA checkpoint"), flush=True)
        return {"test_ema": metrics}


def promote_ema(run_dir, meta):
    """``DIR/best_ema``: the EMA weights of ``DIR/last`` as a checkpoint of their own. Main process only."""
    ckpt.promote(run_dir / "last", run_dir / BEST_EMA, meta, weights=EMA_FILE)


def reconcile_best_ema(run_dir, last_meta):
    """``best_ema`` made what ``last``'s state names (a kill between writing ``last`` and the promotion)."""
    ts = last_meta["train_state"]
    want = ts.get("ema_best_step")
    if want is None or want != ts["global_step"]:
        return None  # ``last`` holds the best EMA only when it was written at that step
    meta_path = run_dir / BEST_EMA / ckpt.META
    have = json.loads(meta_path.read_text())["train_state"]["global_step"] if meta_path.is_file() else None
    if have == want:
        return None
    promote_ema(run_dir, last_meta)
    return f"{run_dir / BEST_EMA} was behind the training state: promoted again from last"
