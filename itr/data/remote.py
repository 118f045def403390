"""Shards read where they live: ``http(s)://`` base URLs and ``pipe:`` commands, as WebDataset opens them.

A remote ``data.root`` is a base URL (``https://host/f30k``: files are ``BASE/NAME``) or a template holding
``{name}`` (``pipe:aws s3 cp s3://bucket/f30k/{name} -``, ``https://host/get?f={name}``). The small files
(the manifest and the captions sidecar) are fetched into ``$ITR_CACHE/remote/`` and read from there; shards
are streamed during training and never stored. Verification streams each shard once and remembers it by the
manifest's checksum, since a remote file has no mtime to key a cache on.
"""
import hashlib
import os
import tarfile
from pathlib import Path

from itr.data.precomp import DataError

SCHEMES = ("http://", "https://", "pipe:")


def is_remote(root) -> bool:
    return isinstance(root, str) and root.startswith(SCHEMES)


def url_of(root, name):
    return root.replace("{name}", name) if "{name}" in root else f"{root.rstrip('/')}/{name}"


def open_url(url):
    """A binary stream of ``url`` (curl for http(s), a shell pipe for ``pipe:``): WebDataset's own opener."""
    from webdataset.gopen import gopen

    return gopen(url, "rb")


def read_url(url) -> bytes:
    try:
        with open_url(url) as f:
            return f.read()
    except Exception as e:  # curl's exit status surfaces at close (e.g. 22 for an HTTP 404)
        raise DataError(f"cannot read {url} ({type(e).__name__}: {e})") from None


def fetch(url, path):
    """``url`` into the local file ``path``, atomically (several ranks may fetch the same small file)."""
    _write(Path(path), read_url(url))


def _write(path, data):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def verify_remote(url, s, m, mode, cache):
    """One remote shard against its manifest entry by streaming it once; True when it was read now."""
    entry = ["remote", s["sha256"], s.get("num_images")]
    if cache.get(s["name"]) == entry:
        return False
    h, size = hashlib.sha256(), 0
    try:
        with open_url(url) as f:
            while b := f.read(1 << 22):
                h.update(b)
                size += len(b)
    except Exception as e:
        raise DataError(f"shard {url} is unreadable ({type(e).__name__}: {e})") from None
    if size != s["bytes"]:
        raise DataError(f"shard {url} is corrupt or truncated: {size} bytes, manifest says {s['bytes']}")
    if mode == "checksum" and h.hexdigest() != s["sha256"]:
        raise DataError(f"shard {url} is corrupt: sha256 {h.hexdigest()[:12]}... != manifest {s['sha256'][:12]}...")
    if mode == "checksum":
        cache[s["name"]] = entry
    return mode == "checksum"


def open_tar(path):
    """A tar to iterate once, local or remote (stream mode: no seeking over a pipe)."""
    if is_remote(path):
        return tarfile.open(fileobj=open_url(path), mode="r|")
    return tarfile.open(Path(path))
