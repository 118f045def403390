"""Name -> (config dataclass, builder) tables, so recipes can name components.

A recipe section such as ``model.text: {name: gru, word_dim: 300}`` is validated
against the dataclass registered under that name: unknown keys fail before any
data is read, and every valid key (with its default) is listed in the error.
"""
from dataclasses import dataclass
from typing import Callable, Dict


@dataclass
class Entry:
    name: str
    config: type
    build: Callable


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Entry] = {}

    def register(self, name: str, config: type):
        def deco(fn):
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = Entry(name, config, fn)
            return fn

        return deco

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            import difflib  # (a leaf: itr.errors.did_you_mean, written out)

            close = difflib.get_close_matches(str(name), list(self._entries), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise KeyError(
                f"unknown {self.kind} {name!r}{hint}; registered: {', '.join(sorted(self._entries)) or '(none)'}"
            )
        return self._entries[name]

    def names(self):
        return sorted(self._entries)


MODELS = Registry("model")
IMAGE_ENCODERS = Registry("image encoder")
TEXT_ENCODERS = Registry("text encoder")
REGISTRIES = {"model": MODELS, "image": IMAGE_ENCODERS, "text": TEXT_ENCODERS}  # a component field names its kind
