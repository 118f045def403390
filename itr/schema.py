"""The recipe schema toolkit: typed keys with a default, a help line and a range; components chosen by name.

Every component (the recipe, a model, an encoder) declares its keys as dataclass fields made with ``param``;
a field made with ``component`` is a nested section whose valid keys depend on the ``name`` it picks from a
registry (``itr.registry``). ``build_section`` turns a recipe's dict into typed objects once, checking types,
ranges and unknown keys (which it lists), before any data is read. A leaf module: it imports no model code
(models import it to declare their keys).
"""
import dataclasses
import math
import os
import typing
from dataclasses import field
from pathlib import Path
from typing import List, Dict

from itr.errors import ConfigError, did_you_mean
from itr.registry import REGISTRIES


def param(default, help, **meta):
    """A recipe key: its default and the one line of help that `itr config` prints.

    Ranges (checked when a recipe loads): ``min`` / ``max`` (inclusive), ``gt`` (exclusive). An int key is
    ``min=0`` unless it says otherwise (``min=None``); a float key is always finite. ``choices``: the allowed
    values of a string key."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def component(default_name: str, registry: str, help: str):
    """A nested section whose valid keys depend on its ``name`` (looked up in ``registry``)."""
    return field(default_factory=lambda: {"name": default_name}, metadata={"help": help, "registry": registry})


class Component:
    """A registered component picked by ``name``, with its typed config; reading an attribute other than ``name``
    reads the config's (``cfg.text.word_dim``)."""

    __slots__ = ("name", "config")

    def __init__(self, name, config):
        self.name, self.config = name, config

    def __getattr__(self, key):
        if key in Component.__slots__:  # not set yet (copy, unpickle)
            raise AttributeError(key)
        return getattr(self.config, key)

    def __eq__(self, other):
        return isinstance(other, Component) and (self.name, self.config) == (other.name, other.config)

    def __repr__(self):
        return f"Component({self.name!r}, {self.config!r})"


def component_name(x):
    """The name a component field picks, whether built (``Component``) or a raw ``{name: ...}`` default."""
    return x.name if isinstance(x, Component) else x.get("name")


# ----------------------------------------------------------------------------- building


def _coerce_scalar(value, tp):
    """``value`` as ``tp`` (bool, int, float, str), or None when it cannot be read as one."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
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
        if isinstance(value, bool):  # the word a YAML reader made a boolean (recipes read only true / false so)
            return "true" if value else "false"
        if isinstance(value, (str, int, float)):
            return str(value)
    return None


def coerce(value, tp, key):
    """``value`` read as the field type ``tp``; a ConfigError naming ``key`` when it cannot be."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return coerce(value, args[0], key)
    if tp in (bool, int, float, str):
        out = _coerce_scalar(value, tp)
        if out is not None:
            return out
    elif origin in (list, List) or tp is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif origin in (dict, Dict) or tp is dict:
        if isinstance(value, dict):
            return value
    else:
        return value
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def check_range(key, value, tp, meta):
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}={value!r}; choose one of {', '.join(map(str, meta['choices']))}")
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


def build_section(cls, raw, path):
    """Instantiate dataclass ``cls`` from dict ``raw`` (components typed too); unknown keys are an error naming them."""
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
            f"unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(where + k + did_you_mean(where + k, [where + f for f in fields]) for k in unknown)}; "
            f"valid keys{' in ' + path if path else ''}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if "registry" in f.metadata:
            kwargs[name] = build_component(f.metadata["registry"], raw.get(name, f.default_factory()), key)
        elif name in raw:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = build_section(hints[name], raw[name], key)
            else:
                kwargs[name] = coerce(raw[name], hints[name], key)
                check_range(key, kwargs[name], hints[name], f.metadata)
    return cls(**kwargs)


def build_component(kind, raw, path):
    """A ``Component`` of registry ``kind`` from ``{name: ..., keys...}`` (or just the name)."""
    if isinstance(raw, Component):
        return raw
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict) or "name" not in raw:
        raise ConfigError(f"{path}: expected a mapping with a 'name' key, got {raw!r}")
    try:
        entry = REGISTRIES[kind].get(raw["name"])
    except KeyError as e:
        raise ConfigError(f"{path}.name: {e.args[0]}") from None
    return Component(raw["name"], build_section(entry.config, {k: v for k, v in raw.items() if k != "name"}, path))


# ----------------------------------------------------------------------------- reading back


def to_dict(obj):
    """Plain dicts and lists of a typed recipe (what recipe.yaml and MLflow's params hold)."""
    if isinstance(obj, Component):
        return {"name": obj.name, **to_dict(obj.config)}
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


def describe(cls, prefix="", values=None):
    """Lines ``key = value  # help`` for every key of ``cls`` (``values``: a built instance; used by ``itr config``)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        val = getattr(values, f.name) if values is not None else None
        if "registry" in f.metadata:
            comp = val if val is not None else build_component(f.metadata["registry"], f.default_factory(), key)
            lines.append(f"{key}.name = {comp.name}  # {f.metadata['help']}")
            lines += describe(type(comp.config), key + ".", comp.config)
        elif dataclasses.is_dataclass(hints[f.name]):
            lines += describe(hints[f.name], key + ".", val)
        else:
            shown = val if values is not None else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            lines.append(f"{key} = {shown!r}  # {f.metadata.get('help', '')}")
    return lines


def resolve_path(p: str) -> Path:
    """Recipe paths: ~ and $VARS expanded, relative to the current directory. A remote data root
    (``http(s)://``, ``pipe:``; itr/data/remote.py) stays the string it is."""
    if isinstance(p, str) and p.startswith(("http://", "https://", "pipe:")):
        return p
    return Path(os.path.expandvars(os.path.expanduser(p))).resolve()
