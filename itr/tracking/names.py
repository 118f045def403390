"""Metric names: one prefix per section of MLflow's run page (the UI groups ``train/...``, ``dev/...``, ...).

- ``train/loss``: the step's loss per pair under the hardest negative (or VSE0's sum when ``loss.max_violation``
  is off); ``train/loss_warmup``: the summed violations of ``loss.warmup_epochs``, ~100x larger, kept apart so
  the switch does not read as a collapse. ``train/lr``, ``train/grad_norm``, ... every ``train.log_every`` steps.
- ``dev/<metric>`` and ``dev/epoch`` at the optimizer step of the evaluation, so dev and train curves share
  the step axis; ``dev/epoch`` says which epoch each point closes.
- ``test/<metric>``: the recipe's test split under its protocol; ``<split>_<protocol>/<metric>``
  (``test_5k/rsum``, ``test_1k_top50/rsum``) for any other evaluation, one family per protocol.

Runs logged before these names (``loss``, ``dev_rsum`` per epoch, ``test_rsum`` + ``test_1k_rsum``) are read
through ``normalize`` and ``history_keys``. No MLflow here.
"""
from itr.tracking.runinfo import metric_prefix, protocol_key

TEST = "test"
STEP = ("lr", "grad_norm", "samples_per_sec", "epoch", "skipped_steps", "cpu_rss_mb", "gpu_mem_max_mb")
SUMMARY = {"samples_per_sec_mean": "train_samples_per_sec", "wall_s": "train_wall_s",
           "epochs_completed": "epochs_completed"}  # train/<new>: <name before the prefixes>


def loss_key(warmup):
    return "train/loss_warmup" if warmup else "train/loss"


def train_metrics(loss, warmup, **values):
    """One logged step: the loss under its key, then ``train/<name>`` for every other value."""
    return {loss_key(warmup): loss, **{f"train/{k}": v for k, v in values.items()}}


def family_metrics(family, metrics):
    """``{family}/{key}`` for the eleven protocol metrics of ``metrics``."""
    from itr.eval.metrics import KEYS

    return {f"{family}/{k}": metrics[k] for k in KEYS if k in metrics}


def eval_family(split, protocol, extra="", recipe_test=None):
    """``test`` for the recipe's own test split and protocol (``recipe_test``: (split, protocol)), else
    ``{split}_{protocol}{extra}`` (``test_5k``, ``testall_coco5fold``, ``test_1k_top50``)."""
    if recipe_test and not extra and split == recipe_test[0] and protocol_key(protocol) == protocol_key(recipe_test[1]):
        return TEST
    return metric_prefix(split, protocol, extra).rstrip("_")


def new_name(key):
    """The current name of a metric key logged before the prefixes (``dev_rsum`` -> ``dev/rsum``,
    ``test_1k_i2t_R1`` -> ``test_1k/i2t_R1``, ``loss`` -> ``train/loss``); a current key is returned as it is."""
    from itr.eval.metrics import KEYS

    if "/" in key:
        return key
    if key == "loss" or key in STEP:
        return f"train/{key}"
    for new, old in SUMMARY.items():
        if key == old:
            return f"train/{new}"
    for k in KEYS:
        if key.endswith(f"_{k}"):
            return f"{key[:-len(k) - 1]}/{k}"
    return key


def normalize(metrics):
    """A run's latest metrics under the current names; a current key wins over an old one."""
    out = {new_name(k): v for k, v in metrics.items() if "/" not in k}
    out.update({k: v for k, v in metrics.items() if "/" in k})
    return out


def history_keys(key):
    """The names ``key`` may have in a run's store, current first: ``dev/rsum`` -> (``dev/rsum``, ``dev_rsum``)."""
    family, _, name = key.partition("/")
    if family == "train":
        old = SUMMARY.get(name, "loss" if name == "loss" else name)
    else:
        old = f"{family}_{name}"
    return (key, old)


def families(metrics):
    """The evaluation families of normalized ``metrics`` that have an rsum (``test``, ``test_5k``, ...), no ``dev``
    nor ``dev_ema`` (the per-epoch evaluations)."""
    return sorted(k[:-len("/rsum")] for k in metrics if k.endswith("/rsum") and k not in ("dev/rsum", "dev_ema/rsum"))
