"""Recipes: YAML files that name components, plus dotted ``key=value`` overrides.

Every key a recipe may set is a dataclass field below (or in the config class a component registered itself
with), with its default, a one-line ``help`` and its range (the toolkit is ``itr.schema``). ``itr config RECIPE``
prints them all. An unknown key is an error that lists the valid keys at that level, raised before any data is
read. ``load_recipe`` builds every section, the model's with its text and image encoders, into typed objects
once. Models register themselves when ``itr.models`` is imported; this module imports it by name when a recipe
loads (the plugin discovery), never statically.
"""
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import yaml

from itr.errors import ConfigError  # noqa: F401  (re-exported)
from itr.modules.losses import LossConfig
from itr.recipe_yaml import load_yaml
from itr.schema import Component, build_section, component, param, to_dict
from itr.schema import describe as describe_cls
from itr.schema import flatten, resolve_path  # noqa: F401  (re-exported)


@dataclass
class DataConfig:
    name: str = param("", "dataset name for MLflow tags and run names (default: the data.root folder name)")
    root: str = param("", "precomp directory ({split}_ims.npy, {split}_caps.txt), a shard directory "
                          "({split}.manifest.json), or remote shards: an http(s):// base URL or a template with "
                          "{name} (pipe:CMD {name}), streamed as WebDataset reads them")
    train_split: str = param("train", "split used for training")
    dev_split: str = param("dev", "split evaluated after each epoch; picks the best checkpoint")
    test_split: str = param("test", "split evaluated at the end of training")
    shard_dir: Optional[str] = param(None, "where precomp data is sharded on first use (default: $ITR_CACHE or ~/.cache/itr, keyed by data.root)")
    dtype: str = param("float16", "feature dtype stored in shards: float16 or float32", choices=("float16", "float32"))
    images_per_shard: int = param(1000, "images per tar shard when sharding precomp data", min=1)
    num_workers: int = param(2, "DataLoader worker processes per rank")
    shuffle_buffer: int = param(5000, "caption-pair shuffle buffer (per worker)", min=1)
    verify: str = param("checksum", "shard check before training: checksum (sha256, cached), size, none",
                         choices=("checksum", "size", "none"))
    on_error: str = param("error", "a corrupt sample or shard: error (naming shard and key) or skip (counted, "
                                   "logged to the console and MLflow as data/skipped)", choices=("error", "skip"))
    max_words: int = param(0, "truncate captions to this many tokens (0: no limit)")
    image_size: int = param(224, "raw-image shards: crop size (train: random resized crop + flip; eval: resize, center crop)")


@dataclass
class TrainConfig:
    epochs: int = param(30, "training epochs", min=1)
    batch_size: int = param(128, "GLOBAL batch per optimizer step (split over ranks and accumulation steps)", min=1)
    grad_accum: int = param(1, "gradient accumulation steps per optimizer step", min=1)
    mixed_precision: str = param("no", "no, bf16 or fp16", choices=("no", "bf16", "fp16"))
    grad_clip: float = param(2.0, "clip the global gradient norm to this value (0: off)", min=0.0)
    seed: int = param(0, "seed for init, data order and augmentation", min=None)
    world_size: int = param(0, "expected number of processes; a mismatch is an error (0: accept any)")
    max_steps: int = param(0, "stop after this many optimizer steps (0: train all epochs)")
    log_every: int = param(10, "log loss / lr / throughput every N optimizer steps", min=1)
    checkpoint_every: int = param(0, "also write DIR/last every N optimizer steps (0: at epoch ends only)")
    resume: Optional[str] = param(None, "'latest' (DIR/last if present) or a checkpoint directory")
    init_from: Optional[str] = param(None, "start from these weights (a checkpoint or run directory, e.g. one "
                                           "`itr import` wrote), with its vocabulary; the optimizer starts afresh")
    deepspeed: Optional[str] = param(None, "DeepSpeed JSON (launch/ds_zero*.json); default: the one given to "
                                           "`accelerate launch --use_deepspeed`, else none (DDP)")
    compile: bool = param(False, "torch.compile the model")
    ema_decay: float = param(0.0, "keep an exponential moving average of the weights with this decay per optimizer "
                                  "step (e.g. 0.999; 0: off); evaluated on dev each epoch, its best saved as DIR/best_ema",
                             min=0.0, max=0.99999999)
    patience: int = param(0, "early stopping: stop after this many epochs without a new best dev eval.best_metric "
                             "(of the model or its EMA); 0: train every epoch", min=0)
    score_test: bool = param(True, "score DIR/best (and DIR/best_ema) on data.test_split at the end; false in the "
                                   "sweep that chooses a recipe on dev (the test split is then never read, not even "
                                   "checked): score the chosen run once with `itr eval DIR/best --split test`")


@dataclass
class OptimConfig:
    name: str = param("adam", "adam or adamw", choices=("adam", "adamw"))
    lr: float = param(2e-4, "base learning rate (0: the weights stay as initialised)", min=0.0)
    weight_decay: float = param(0.0, "weight decay", min=0.0)
    schedule: str = param("step", "step (x lr_decay every lr_update epochs, VSE++), linear or cosine (to 0 over training)",
                         choices=("step", "linear", "cosine"))
    lr_update: int = param(15, "step schedule: multiply the lr by lr_decay every lr_update epochs")
    lr_decay: float = param(0.1, "step schedule: decay factor")
    warmup_steps: int = param(0, "linear warm-up over this many optimizer steps (TGDT: 1000)")
    warmup_ratio: float = param(0.0, "or over this fraction of all optimizer steps (xmatching: 0.05)", min=0.0, max=1.0)
    text_lr_mult: float = param(1.0, "lr multiplier of a pretrained (transformers) text encoder, e.g. 0.1", min=0.0)
    no_decay: List[str] = param([], "parameter-name substrings exempt from weight decay (BERT fine-tuning: bias, LayerNorm.weight)")
    impl: str = param("auto", "auto (apex fused if it imports, else torch fused/foreach), apex, fused, foreach, plain",
                     choices=("auto", "apex", "fused", "foreach", "plain"))


@dataclass
class EvalConfig:
    protocol: str = param("1k", "1k (whole split), coco-5fold (mean over 5 folds), 5k (whole split)",
                         choices=("1k", "coco-5fold", "5k"))
    chunk_size: int = param(1024, "rows per similarity / rank tile; bounds eval memory", min=1)
    batch_size: int = param(256, "batch size when embedding a split")
    spill_gib: float = param(1.0, "plain embeddings of a side (images or captions) over this many GiB go to a file "
                                  "read tile by tile, so a rank's memory stays flat as the gallery grows; 0: always",
                             min=0)
    spill_dir: Optional[str] = param(None, "folder of that (unlinked) file; default $TMPDIR (a node-local disk on a "
                                           "cluster)")
    best_metric: str = param("rsum", "dev metric that selects DIR/best (higher is better)",
                            choices=("rsum", "i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5", "t2i_R10"))


@dataclass
class TrackingConfig:
    enabled: bool = param(True, "log to MLflow (rank 0 only)")
    uri: Optional[str] = param(None, "MLflow tracking URI (default: sqlite:///<cwd>/mlflow.db, MLflow's own default)")
    experiment: str = param("itr", "MLflow experiment name")
    run_name: Optional[str] = param(None, "MLflow run name (default: model-dataset-time)")
    sweep: Optional[str] = param(None, "MLflow tag `sweep` grouping a sweep's runs (default: $ITR_SWEEP)")
    max_artifact_mb: Optional[float] = param(None, "the best checkpoint is logged as an artifact up to this size, "
                                                   "else only a tag naming where it lives (default: "
                                                   "$ITR_MLFLOW_MAX_ARTIFACT_MB or 200)")


@dataclass
class Recipe:
    model: Component = component("vsepp", "model", "the model (registered name) and its keys")
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ----------------------------------------------------------------------------- loading

def parse_override(text):
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. train.epochs=5)")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    return key, load_yaml(value) if value.strip() else ""


def apply_override(raw, key, value):
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if isinstance(nxt, str) and part in ("model", "image", "text"):
            nxt = {"name": nxt}
        if nxt is None:
            nxt = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node[part] = nxt
        node = nxt
    node[parts[-1]] = value


def load_recipe(path=None, overrides=(), raw=None) -> "Recipe":
    if raw is None:
        raw = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"recipe {path} does not exist")
            try:
                raw = load_yaml(p.read_text()) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"recipe {path}: top level must be a mapping")
    raw = to_dict(raw)
    for ov in overrides:
        key, value = parse_override(ov) if isinstance(ov, str) else ov
        apply_override(raw, key, value)
    discover()
    recipe = build_section(Recipe, raw, "")
    return recipe


def discover():
    """Import ``itr.models`` (by name) so that every model and encoder has registered itself."""
    importlib.import_module("itr.models")


def recipe_from_dict(d) -> Recipe:
    return load_recipe(raw=d)


def describe(cls=Recipe, prefix="", values=None):
    """Lines ``key = value  # help`` for every key (``itr config``)."""
    discover()
    return describe_cls(cls, prefix, values)
