"""Recipes as YAML, read and written.

Read: YAML 1.1 (PyYAML) turns ``no``, ``yes``, ``on`` and ``off`` into booleans, so ``train.mixed_precision=no``
would arrive as False and fail as "expected str". Only ``true`` / ``false`` are booleans here (YAML 1.2's core
schema); the other words stay the words typed, and the schema reads them as booleans where a key is one
(``itr.schema.coerce``).

Written: ``dump_recipe`` is a complete recipe (every key, defaults filled in) that loads back to the same
``Recipe``, each key commented with its help and, where the value differs from the default, ``set (default:
X)``.
"""
import dataclasses
import re
import typing

import yaml

from itr.schema import to_dict

BOOL_TAG = "tag:yaml.org,2002:bool"


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans (true / false in any case) only."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_yaml(text):
    return yaml.load(text, Loader=RecipeLoader)


# ----------------------------------------------------------------------------- writing


def _scalar(value):
    """``value`` as one line of YAML that reads back (with ``RecipeLoader``) as the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, allow_unicode=True).rstrip("\n")
    return text[:-len("\n...")] if text.endswith("\n...") else text


def _default(f):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _comment(help_text, value, default):
    if value == default:
        return help_text
    return f"set (default: {_scalar(to_dict(default))}); {help_text}" if help_text else \
        f"set (default: {_scalar(to_dict(default))})"


def _section(values, indent):
    """The lines of dataclass instance ``values``, nested sections and components included."""
    lines, pad = [], "  " * indent
    hints = typing.get_type_hints(type(values))
    for f in dataclasses.fields(values):
        val, help_text = getattr(values, f.name), f.metadata.get("help", "")
        if "registry" in f.metadata:
            default_name = f.default_factory()["name"]
            lines.append(f"{pad}{f.name}:  # {help_text}")
            lines.append(f"{pad}  name: {_scalar(val.name)}  # {_comment('registered name', val.name, default_name)}")
            lines += _section(val.config, indent + 1)
        elif dataclasses.is_dataclass(hints[f.name]):
            lines.append(f"{pad}{f.name}:" + (f"  # {help_text}" if help_text else ""))
            lines += _section(val, indent + 1)
        else:
            comment = _comment(help_text, val, _default(f))
            lines.append(f"{pad}{f.name}: {_scalar(to_dict(val))}" + (f"  # {comment}" if comment else ""))
    return lines


def dump_recipe(recipe, source=None):
    """``recipe`` as a complete YAML recipe: every key with its value, help and, where it differs from the
    default (of the component chosen), ``set (default: X)``."""
    where = f"{source} with every default filled in" if source else "every key of a recipe, defaults filled in"
    head = [f"# {where} (`itr config --yaml`); \"set\" marks the values that differ from the defaults."]
    return "\n".join(head + _section(recipe, 0)) + "\n"

