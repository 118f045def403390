"""Recipes: YAML files that name components, plus dotted ``key=value`` overrides.

Every key a recipe may set is a dataclass field below (or in the config class a
component registered itself with), with its default and a one-line ``help``.
``itr config RECIPE`` prints them all. An unknown key is an error that lists the
valid keys at that level, raised before any data is read.
"""
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml


from itr.errors import ConfigError  # noqa: F401  (re-exported)


def param(default, help, **meta):
    """A recipe key: its default and the one line of help that `itr config` prints.

    Ranges (checked when a recipe loads): ``min`` / ``max`` (inclusive), ``gt`` (exclusive). An int key is
    ``min=0`` unless it says otherwise (``min=None``); a float key is always finite."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def component(default_name: str, registry: str, help: str):
    """A nested section whose valid keys depend on its ``name`` (looked up in ``registry``)."""
    return field(
        default_factory=lambda: {"name": default_name},
        metadata={"help": help, "registry": registry},
    )


@dataclass
class DataConfig:
    name: str = param("", "dataset name for MLflow tags and run names (default: the data.root folder name)")
    root: str = param("", "precomp directory ({split}_ims.npy, {split}_caps.txt) or a shard directory ({split}.manifest.json)")
    train_split: str = param("train", "split used for training")
    dev_split: str = param("dev", "split evaluated after each epoch; picks the best checkpoint")
    test_split: str = param("test", "split evaluated at the end of training")
    shard_dir: Optional[str] = param(None, "where precomp data is sharded on first use (default: $ITR_CACHE or ~/.cache/itr, keyed by data.root)")
    dtype: str = param("float16", "feature dtype stored in shards: float16 or float32")
    images_per_shard: int = param(1000, "images per tar shard when sharding precomp data", min=1)
    num_workers: int = param(2, "DataLoader worker processes per rank")
    shuffle_buffer: int = param(5000, "caption-pair shuffle buffer (per worker)", min=1)
    verify: str = param("checksum", "shard check before training: checksum (sha256, cached), size, none")
    max_words: int = param(0, "truncate captions to this many tokens (0: no limit)")
    image_size: int = param(224, "raw-image shards: crop size (train: random resized crop + flip; eval: resize, center crop)")


@dataclass
class TrainConfig:
    epochs: int = param(30, "training epochs")
    batch_size: int = param(128, "GLOBAL batch per optimizer step (split over ranks and accumulation steps)")
    grad_accum: int = param(1, "gradient accumulation steps per optimizer step")
    mixed_precision: str = param("no", "no, bf16 or fp16")
    grad_clip: float = param(2.0, "clip the global gradient norm to this value (0: off)", min=0.0)
    seed: int = param(0, "seed for init, data order and augmentation", min=None)
    world_size: int = param(0, "expected number of processes; a mismatch is an error (0: accept any)")
    max_steps: int = param(0, "stop after this many optimizer steps (0: train all epochs)")
    log_every: int = param(10, "log loss / lr / throughput every N optimizer steps", min=1)
    checkpoint_every: int = param(0, "also write DIR/last every N optimizer steps (0: at epoch ends only)")
    resume: Optional[str] = param(None, "'latest' (DIR/last if present) or a checkpoint directory")
    deepspeed: Optional[str] = param(None, "DeepSpeed JSON (launch/ds_zero*.json); default: the one given to "
                                           "`accelerate launch --use_deepspeed`, else none (DDP)")
    compile: bool = param(False, "torch.compile the model")


@dataclass
class OptimConfig:
    name: str = param("adam", "adam or adamw")
    lr: float = param(2e-4, "base learning rate (0: the weights stay as initialised)", min=0.0)
    weight_decay: float = param(0.0, "weight decay", min=0.0)
    schedule: str = param("step", "step (x lr_decay every lr_update epochs, VSE++), linear or cosine (to 0 over training)")
    lr_update: int = param(15, "step schedule: multiply the lr by lr_decay every lr_update epochs")
    lr_decay: float = param(0.1, "step schedule: decay factor")
    warmup_steps: int = param(0, "linear warm-up over this many optimizer steps (TGDT: 1000)")
    warmup_ratio: float = param(0.0, "or over this fraction of all optimizer steps (xmatching: 0.05)", min=0.0, max=1.0)
    text_lr_mult: float = param(1.0, "lr multiplier of a pretrained (transformers) text encoder, e.g. 0.1", min=0.0)
    no_decay: List[str] = param([], "parameter-name substrings exempt from weight decay (BERT fine-tuning: bias, LayerNorm.weight)")
    impl: str = param("auto", "auto (apex fused if it imports, else torch fused/foreach), apex, fused, foreach, plain")


@dataclass
class LossConfig:
    name: str = param("hinge", "loss name (registered)")
    margin: float = param(0.2, "hinge margin")
    max_violation: bool = param(True, "hardest negative only (VSE++); false sums all violations (VSE0)")
    warmup_epochs: int = param(0, "epochs of summed violations before switching to max violation (VSE-infinity uses 1)")
    mask_same_image: bool = param(True, "captions of the same image in a batch are not negatives (across ranks too)")
    global_negatives: bool = param(True, "mine negatives over the global batch (all ranks, gathered with gradients); "
                                         "false: each rank's own pairs only")


@dataclass
class EvalConfig:
    protocol: str = param("1k", "1k (whole split), coco-5fold (mean over 5 folds), 5k (whole split)")
    chunk_size: int = param(1024, "rows per similarity / rank tile; bounds eval memory")
    batch_size: int = param(256, "batch size when embedding a split")
    best_metric: str = param("rsum", "dev metric that selects DIR/best")


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
    model: Dict[str, Any] = component("vsepp", "model", "the model (registered name) and its keys")
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ----------------------------------------------------------------------------- validation

def _registry(kind):
    from itr import registry  # late: models register on import of itr.models

    import itr.models  # noqa: F401
    return {
        "model": registry.MODELS,
        "image": registry.IMAGE_ENCODERS,
        "text": registry.TEXT_ENCODERS,
    }[kind]


def _coerce(value, tp, key):
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(value, args[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif tp is int:
        if isinstance(value, bool):
            pass
        elif isinstance(value, int):
            return value
        elif isinstance(value, float) and value.is_integer():
            return int(value)
        elif isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin in (list, List) or tp is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif origin in (dict, Dict) or tp is dict:
        if isinstance(value, dict):
            return value
    else:
        return value
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def build_section(cls, raw, path):
    """Instantiate dataclass ``cls`` from dict ``raw``; unknown keys are an error naming them."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'recipe'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(where + k for k in unknown)}; "
            f"valid keys{' in ' + path if path else ''}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if "registry" in f.metadata:
            sub = raw.get(name, f.default_factory())
            kwargs[name] = build_component(f.metadata["registry"], sub, key)
        elif name in raw:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = build_section(hints[name], raw[name], key)
            else:
                kwargs[name] = _coerce(raw[name], hints[name], key)
                _check_range(key, kwargs[name], hints[name], f.metadata)
    return cls(**kwargs)


def _check_range(key, value, tp, meta):
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    lo = meta.get("min", 0 if tp is int else None)
    if lo is not None and value < lo:
        raise ConfigError(f"{key} must be >= {lo}, got {value}")
    if "gt" in meta and value <= meta["gt"]:
        raise ConfigError(f"{key} must be > {meta['gt']}, got {value}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{key} must be <= {meta['max']}, got {value}")


def build_component(kind, raw, path):
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict) or "name" not in raw:
        raise ConfigError(f"{path}: expected a mapping with a 'name' key, got {raw!r}")
    reg = _registry(kind)
    try:
        entry = reg.get(raw["name"])
    except KeyError as e:
        raise ConfigError(f"{path}.name: {e.args[0]}") from None
    body = {k: v for k, v in raw.items() if k != "name"}
    obj = build_section(entry.config, body, path)
    return {"name": raw["name"], **to_dict(obj)}


def to_dict(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ----------------------------------------------------------------------------- loading

def parse_override(text):
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. train.epochs=5)")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    return key, yaml.safe_load(value) if value.strip() else ""


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
                raw = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"recipe {path}: top level must be a mapping")
    raw = to_dict(raw)
    for ov in overrides:
        key, value = parse_override(ov) if isinstance(ov, str) else ov
        apply_override(raw, key, value)
    recipe = build_section(Recipe, raw, "")
    _check_values(recipe)
    return recipe


def _check_values(r: Recipe):
    def choice(key, value, allowed):
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}; choose one of {', '.join(map(str, allowed))}")

    choice("train.mixed_precision", r.train.mixed_precision, ("no", "bf16", "fp16"))
    choice("data.dtype", r.data.dtype, ("float16", "float32"))
    choice("data.verify", r.data.verify, ("checksum", "size", "none"))
    choice("optim.name", r.optim.name, ("adam", "adamw"))
    choice("optim.impl", r.optim.impl, ("auto", "apex", "fused", "foreach", "plain"))
    choice("optim.schedule", r.optim.schedule, ("step", "linear", "cosine"))
    choice("eval.protocol", r.eval.protocol, ("1k", "coco-5fold", "5k"))
    choice("eval.best_metric", r.eval.best_metric,
           ("rsum", "i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5", "t2i_R10"))  # higher is better
    for key, value in (("train.batch_size", r.train.batch_size), ("train.grad_accum", r.train.grad_accum),
                       ("train.epochs", r.train.epochs), ("eval.chunk_size", r.eval.chunk_size)):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")


def recipe_from_dict(d) -> Recipe:
    return load_recipe(raw=d)


def describe(cls=Recipe, prefix="", values=None):
    """Lines ``key = value  # help`` for every key (used by ``itr config``)."""
    lines = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        val = getattr(values, f.name) if values is not None else None
        if "registry" in f.metadata:
            comp = val if val is not None else f.default_factory()
            entry = _registry(f.metadata["registry"]).get(comp["name"])
            lines.append(f"{key}.name = {comp['name']}  # {f.metadata['help']}")
            obj = build_section(entry.config, {k: v for k, v in comp.items() if k != "name"}, key)
            lines += describe(entry.config, key + ".", obj)
        elif dataclasses.is_dataclass(f.type) or (isinstance(f.type, type) and dataclasses.is_dataclass(f.type)):
            lines += describe(f.type, key + ".", val)
        else:
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                lines += describe(hint, key + ".", val)
                continue
            shown = val if values is not None else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            lines.append(f"{key} = {shown!r}  # {f.metadata.get('help', '')}")
    return lines


def resolve_path(p: str) -> Path:
    """Recipe paths: ~ and $VARS expanded, relative to the current directory."""
    return Path(os.path.expandvars(os.path.expanduser(p))).resolve()
