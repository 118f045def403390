"""A shard member's ``.npy`` bytes as an array, never unpickled.

``np.load(allow_pickle=False)`` is the guard; its refusals ("Object arrays cannot be loaded ...", or advice to
load the file unsafely) do not say which sample of which shard holds a pickle, nor that itr never loads one.
This names the member and says so; any other unreadable member keeps numpy's own error."""
import io
import pickle

import numpy as np

from itr.errors import DataError


def _holds_objects(data: bytes) -> bool:
    """Whether a .npy header declares an object dtype (its array is a pickle); False when unparseable."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return read(f)[2].hasobject
    except Exception:
        return False


def load_npy(data: bytes, where: str):
    """The array in ``data``; a pickle (an object-dtype .npy, or a bare pickle) is a ``DataError`` naming
    ``where`` (e.g. "shard PATH: sample KEY: feat.npy")."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError:
        if _holds_objects(data):
            what = "an object-dtype array (pickled Python objects)"
        elif data[:1] == pickle.PROTO:  # how every pickle of protocol 2 and later starts
            what = "a pickle, not a .npy array"
        else:
            raise
    raise DataError(f"{where} holds {what}; itr never unpickles shard data: rebuild the shard with `itr shard`")
