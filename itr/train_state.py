"""What a training run carries across a restart besides weights, optimizer and RNG: one typed, versioned object.

It is saved as ``train_state`` in a checkpoint's ``itr.json``; its field names are that JSON's keys, so a rename
here is a format change: bump ``VERSION`` and teach ``from_dict`` the older layout. Layouts: 1 (itr 0.1 up to
49c3d5a, no ``version`` key, no ``best_step``), 2 (``best_step``, the step the best dev score was reached at), 3
(``segments``, the parts of the current epoch run on another data-stream shape: ``itr.data.segments``), 4 (``ema_best*``,
the best dev score of the weights' moving average: ``itr.aids``).
"""
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from itr.errors import CheckpointError

VERSION = 4


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    micro_in_epoch: int = 0  # micro-batches of the current epoch consumed (the data stream's position)
    global_step: int = 0  # optimizer steps taken
    best: Optional[float] = None  # best dev score (eval.best_metric) so far, and where it was reached
    best_epoch: Optional[int] = None
    best_step: Optional[int] = None
    best_dev: Optional[dict] = None  # every dev metric at the best
    ema_best: Optional[float] = None  # the same for the EMA of the weights (train.ema_decay)
    ema_best_epoch: Optional[int] = None
    ema_best_step: Optional[int] = None
    ema_best_dev: Optional[dict] = None
    run_id: Optional[str] = None  # the MLflow run a resumed run keeps logging to
    skipped_steps: int = 0  # fp16 steps whose gradients overflowed (not applied)
    pending_eval: bool = False  # stopped by a signal right after an epoch's last step: evaluate first on resume
    segments: list = field(default_factory=list)  # this epoch's parts on other stream shapes (itr.data.segments)
    history: dict = field(default_factory=lambda: {"loss": [], "dev": []})  # for the curves: [step, loss], [epoch, dev]

    def to_dict(self):
        return {**asdict(self), "version": VERSION}

    @classmethod
    def from_dict(cls, d, where="itr.json"):
        """A state saved by this or an older itr (a layout without ``version`` is layout 1)."""
        d = dict(d)
        version = d.pop("version", 1)
        if version > VERSION:
            raise CheckpointError(f"{where}: training state layout {version} is newer than this itr's ({VERSION}); "
                                  f"upgrade itr to resume it")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CheckpointError(f"{where}: unknown training state keys {unknown} (layout {version})")
        return cls(**d)
