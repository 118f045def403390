"""``itr index``: a checkpoint's embeddings of a split, saved to search later (``itr search``).

An index directory holds ``images.safetensors`` / ``captions.safetensors`` (the model's embeddings: ``full.*``,
what its ``score`` needs, token-level dicts included; ``global``, the shortlist vectors where they are not the
full embedding, or the file's metadata names the ``full.*`` key that holds them, TGDT's ``full.glob``), ``items.json`` (the images' ids as the dataset names them, the captions; caption j belongs to
image j // 5), optional FAISS files (``images.faiss``, ``captions.faiss``) and ``index.json``: the manifest,
naming the checkpoint (path, a digest of its ``itr.json``, its weights' size, its step) and recipe, the data,
the shortlist and the FAISS parameters with their measured recall@10 against exact search.

The shortlist (``global``) of a search: the model's own global vectors (``MatchingModel.global_vectors``: the
embedding for VSE++ and kin, where the score is the inner product and nothing is reranked; TGDT's global
tokens, reranked by its full score), or another checkpoint's (``--shortlist CKPT``: a cross-attention model
reranks a VSE-infinity shortlist), or none (every gallery item is scored by the model: small galleries only).

A search loads the checkpoint again to embed its queries; an index whose checkpoint changed since (another
``itr.json`` or weights of another size) is refused, naming both.
"""
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from itr.errors import CheckpointError, ConfigError, DataError

FORMAT = 1
MANIFEST, ITEMS = "index.json", "items.json"
SIDES = ("images", "captions")


def model_version(checkpoint):
    """What identifies a checkpoint's weights: a digest of its ``itr.json`` (step, metrics, run), their size."""
    from itr.checkpoint import META, WEIGHTS, resolve

    root = resolve(checkpoint)
    meta = (root / META).read_bytes()
    step = json.loads(meta).get("train_state", {}).get("global_step")
    return {"path": str(root.resolve()), "meta_sha256": hashlib.sha256(meta).hexdigest(),
            "weights_bytes": (root / WEIGHTS).stat().st_size, "global_step": step}


def check_version(index_dir, recorded, checkpoint):
    """The checkpoint loaded for a search must be the one the index was built with."""
    now = model_version(checkpoint)
    if (now["meta_sha256"], now["weights_bytes"]) != (recorded["meta_sha256"], recorded["weights_bytes"]):
        raise CheckpointError(
            f"{index_dir} was built by another model version: the index holds embeddings of {recorded['path']} "
            f"(step {recorded['global_step']}, itr.json sha256 {recorded['meta_sha256'][:12]}), but {now['path']} "
            f"is step {now['global_step']} (itr.json sha256 {now['meta_sha256'][:12]}). Rebuild the index with "
            f"`itr index {now['path']} --data DATA --split SPLIT --out {index_dir}`")
    return now


def _flat(emb, prefix):
    if isinstance(emb, dict):
        return {f"{prefix}.{k}": v.contiguous() for k, v in emb.items()}
    return {prefix: emb.contiguous()}


def _unflat(tensors, prefix):
    if prefix in tensors:
        return tensors[prefix]
    sub = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    return sub or None


@dataclass
class IndexRequest:
    """``itr index``: what to embed and where the index goes."""
    checkpoint: str | Path
    data: str | Path
    split: str
    out: str | Path
    shortlist: str | Path | None = None  # a checkpoint with global vectors, for models without them
    faiss: str | None = None  # flat, ivf or hnsw
    nlist: int = 0
    nprobe: int = 32
    hnsw_m: int = 32
    ef_search: int = 128
    sample: int = 1000  # queries of each direction on which the FAISS recall@10 is measured
    batch_size: int | None = None
    device: str = "cpu"


def _check_dims(split, meta, data, name):
    if split.image_key == "feats" and split.images.shape[-1] != meta["img_dim"]:
        raise DataError(f"{data} split {name!r} has {split.images.shape[-1]}-d features; the checkpoint was "
                        f"trained on {meta['img_dim']}-d")


def _shortlist_vectors(req, model, img, cap, split):
    """(image vectors, caption vectors, source) of the shortlist: see the module docstring."""
    from itr.checkpoint import load_for_eval
    from itr.eval.embed import embed_split

    gi = model.global_vectors(img)
    if gi is not None and req.shortlist is None:
        return (None, None, "self") if gi is img else (gi, model.global_vectors(cap), "self:global")
    if req.shortlist is None:
        return None, None, None
    short, tok, recipe, meta = load_for_eval(req.shortlist, req.device)
    _check_dims(split, meta, req.data, req.split)
    si, sc = embed_split(short, split, tok, req.batch_size or recipe.eval.batch_size, req.device, progress=True)
    gi = short.global_vectors(si)
    if gi is None:
        raise ConfigError(f"--shortlist {req.shortlist}: {type(short).__name__} has no global vectors (its score is "
                          f"not an inner product); give a VSE++ / VSE-infinity / TGDT checkpoint")
    return gi, short.global_vectors(sc), "shortlist"


def build_index(req):
    """Embed ``req.split`` with the checkpoint (and the shortlist's), write the index; returns the manifest."""
    from safetensors.torch import save_file

    from itr.checkpoint import load_for_eval
    from itr.config import to_dict
    from itr.data.sources import load_split
    from itr.eval.embed import embed_split

    if req.faiss:
        from itr.ann import FaissParams, require_faiss

        require_faiss()
        FaissParams(req.faiss)  # a bad kind fails before the embedding
    model, tok, recipe, meta = load_for_eval(req.checkpoint, req.device)
    split = load_split(req.data, req.split, recipe.data.image_size, verify=recipe.data.verify)
    _check_dims(split, meta, req.data, req.split)
    t0 = time.perf_counter()
    img, cap = embed_split(model, split, tok, req.batch_size or recipe.eval.batch_size, req.device, progress=True)
    gi, gc, source = _shortlist_vectors(req, model, img, cap, split)
    if req.faiss and source is None:
        raise ConfigError(f"--faiss searches global vectors and {type(model).__name__} has none: give --shortlist CKPT "
                          f"(a checkpoint with a global score) to shortlist with, or leave --faiss out")
    out = Path(req.out)
    out.mkdir(parents=True, exist_ok=True)
    for side, full, glob in (("images", img, gi), ("captions", cap, gc)):
        tensors, meta = _flat(full, "full"), {}
        if glob is not None:
            same = [k for k, v in tensors.items() if v.data_ptr() == glob.data_ptr() and v.shape == glob.shape]
            if same:  # TGDT's global token is a key of its embedding: named, not stored twice
                meta["global"] = same[0]
            else:
                tensors["global"] = glob.contiguous()
        save_file(tensors, str(out / f"{side}.safetensors"), metadata=meta)
    ids = split.ids or [f"{req.split}:{i}" for i in range(split.num_images)]
    (out / ITEMS).write_text(json.dumps({"image_ids": [str(i) for i in ids], "captions": split.captions}))
    manifest = {
        "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": recipe.model.name,
        "checkpoint": model_version(req.checkpoint), "recipe": to_dict(recipe),
        "data": {"root": str(Path(req.data).resolve()), "split": req.split, "image_key": split.image_key,
                 "files": {k: str(v) for k, v in split.files.items()}},
        "counts": {"images": split.num_images, "captions": len(split.captions)},
        "shortlist": {"source": source, "checkpoint": model_version(req.shortlist) if req.shortlist else None},
        "embed_s": time.perf_counter() - t0, "faiss": None}
    if req.faiss:
        manifest["faiss"] = _build_faiss(req, out, gi if gi is not None else img, gc if gc is not None else cap)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _build_faiss(req, out, gi, gc):
    """A FAISS index per side, and its recall@10 against exact search on a sample of the other side's rows (the
    split's own captions as text queries, its images as image queries)."""
    import faiss

    from itr.ann import FaissParams, build_faiss, measure_recall, sample_rows

    info = {}
    for side, gallery, queries in (("images", gi, gc), ("captions", gc, gi)):
        params = FaissParams(req.faiss, req.nlist, req.nprobe, req.hnsw_m, ef_search=req.ef_search)
        x = gallery.float().numpy()
        index, build_s = build_faiss(x, params)
        faiss.write_index(index, str(out / f"{side}.faiss"))
        q = queries.float().numpy()[sample_rows(len(queries), req.sample)]
        recall = measure_recall(index, q, x, 10)
        info[side] = {"build_s": build_s, "recall_at_10": recall, "sample": len(q)}
        print(f"[itr] FAISS {req.faiss} over the {len(x)} {side}: recall@10 {recall:.3f} against exact search on "
              f"{len(q)} {'caption' if side == 'images' else 'image'} queries (built in {build_s:.1f} s)", flush=True)
    return {"params": vars(params), **info}


class Index:
    """A built index, read back: manifest, items, embeddings (loaded on first use)."""

    def __init__(self, root):
        self.root = Path(root)
        p = self.root / MANIFEST
        if not p.is_file():
            raise DataError(f"{root} is not an itr index (no {MANIFEST}); build one with `itr index CHECKPOINT "
                            f"--data DATA --split SPLIT --out {root}`")
        try:
            self.manifest = json.loads(p.read_text())
            items = json.loads((self.root / ITEMS).read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{root}: unreadable index ({type(e).__name__}: {e})") from None
        if self.manifest.get("format") != FORMAT:
            raise DataError(f"{p}: index format {self.manifest.get('format')}, this itr reads {FORMAT}: rebuild it")
        self.image_ids, self.captions = items["image_ids"], items["captions"]
        self._rows = {i: r for r, i in enumerate(self.image_ids)}
        self._emb = {}

    @property
    def source(self):
        return self.manifest["shortlist"]["source"]

    def embeddings(self, side):
        """(full embedding, shortlist vectors or None) of ``side`` (images or captions)."""
        if side not in self._emb:
            from safetensors import safe_open

            path = self.root / f"{side}.safetensors"
            try:
                with safe_open(str(path), framework="pt") as f:
                    t = {k: f.get_tensor(k) for k in f.keys()}
                    named = (f.metadata() or {}).get("global", "global")
            except Exception as e:
                raise DataError(f"{path} is unreadable ({type(e).__name__}: {e}): rebuild the index") from None
            full = _unflat(t, "full")
            self._emb[side] = (full, full if self.source == "self" else t.get(named))
        return self._emb[side]

    def image_row(self, image_id):
        if image_id not in self._rows:
            near = [i for i in self.image_ids if str(image_id).lower() in i.lower()][:5]
            hint = f"; ids containing it: {', '.join(near)}" if near else f"; e.g. {', '.join(self.image_ids[:3])}"
            raise DataError(f"image id {image_id!r} is not in {self.root} ({len(self.image_ids)} images of split "
                            f"{self.manifest['data']['split']!r}{hint})")
        return self._rows[image_id]

    def faiss_index(self, side):
        """The FAISS index of ``side`` with its search parameters, or None when the index was built without."""
        info = self.manifest.get("faiss")
        if not info:
            return None
        from itr.ann import FaissParams, configure, require_faiss

        faiss = require_faiss(f"{self.root} (built with --faiss {info['params']['kind']}; search it with --exact)")
        return configure(faiss.read_index(str(self.root / f"{side}.faiss")), FaissParams(**info["params"]))

    def load_models(self, checkpoint=None, device="cpu"):
        """(model, tokenizer, recipe) of the index's checkpoint (or ``checkpoint``, the same version moved), and
        (model, tokenizer) of its shortlist checkpoint or None."""
        from itr.checkpoint import load_for_eval

        ck = self.manifest["checkpoint"]
        path = checkpoint or ck["path"]
        check_version(self.root, ck, path)
        model, tok, recipe, _ = load_for_eval(path, device)
        short = None
        if self.source == "shortlist":
            sk = self.manifest["shortlist"]["checkpoint"]
            check_version(self.root, sk, sk["path"])
            m, t, _, _ = load_for_eval(sk["path"], device)
            short = (m, t)
        return model, tok, recipe, short

