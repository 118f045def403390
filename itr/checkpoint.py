"""Checkpoints: ``DIR/last`` (weights + full training state) and ``DIR/best`` (weights).

A checkpoint directory holds ``model.safetensors`` (unwrapped, consolidated weights),
``recipe.yaml``, ``itr.json`` (epoch, step, metrics, MLflow run), the tokenizer
(``vocab.json``, or ``text_model/`` with a transformers config and tokenizer), and for
``last`` the accelerate state (optimizer, RNG, scaler) under ``state/``.
``itr eval`` needs only the first four and imports neither accelerate nor DeepSpeed.

Writes are atomic: everything goes to ``.NAME.tmp`` and is fsynced, then swapped in
with two renames. A kill at any point leaves either the old or the new checkpoint;
if it lands between the renames, ``resolve`` finds the old one at ``.NAME.old``.
"""
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import yaml

META, WEIGHTS, RECIPE, VOCAB, TEXT_MODEL, STATE = "itr.json", "model.safetensors", "recipe.yaml", "vocab.json", "text_model", "state"


from itr.errors import CheckpointError  # noqa: F401  (re-exported)


def _fsync_tree(root):
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _swap_in(tmp: Path, dst: Path):
    old = dst.parent / f".{dst.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    shutil.rmtree(old, ignore_errors=True)


def resolve(path) -> Path:
    """A checkpoint directory; accepts a run directory (uses its ``best``, else ``last``)."""
    p = Path(path)
    if (p / META).is_file():
        return p
    old = p.parent / f".{p.name}.old"
    if (old / META).is_file():  # killed between the two renames of a save
        return old
    for name in ("best", "last"):
        if (p / name / META).is_file():
            return p / name
    raise CheckpointError(f"{path} is not an itr checkpoint (no {META}); expected DIR/last, DIR/best or a run directory")


def _dedup_shared(sd):
    seen, out = {}, {}
    for k, v in sd.items():
        v = v.detach().cpu().contiguous()
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        out[k] = v.clone() if key in seen else v
        if key is not None:
            seen[key] = k
    return out


def write_weights(state_dict, path):
    from safetensors.torch import save_file

    save_file(_dedup_shared(state_dict), str(path))


def save_tokenizer(tokenizer, model, root: Path):
    from itr.data.text import WordVocab

    if isinstance(tokenizer, WordVocab):
        tokenizer.save(root / VOCAB)
        return
    tm = root / TEXT_MODEL
    tm.mkdir(exist_ok=True)
    tokenizer.tok.save_pretrained(tm)
    backbone = getattr(getattr(model, "txt_enc", None), "backbone", None)
    if backbone is not None:
        backbone.config.save_pretrained(tm)


def consolidated_deepspeed_weights(state_dir):
    """fp32 weights rebuilt from a (ZeRO 1-3, partitioned) DeepSpeed checkpoint written by save_state."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(state_dir))


def save(dst, accelerator, model, recipe_dict, tokenizer, meta, with_state=True, deepspeed=False):
    """Atomically write a checkpoint at ``dst``. Collective: call on every rank.

    Under DeepSpeed the weights are the fp32 master weights consolidated from the ZeRO
    partitions (DeepSpeed's zero_to_fp32), so ``itr eval`` reads one safetensors file.
    """
    dst = Path(dst)
    tmp = dst.parent / f".{dst.name}.tmp"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if with_state or deepspeed:
        accelerator.save_state(str(tmp / STATE), safe_serialization=True)
    if deepspeed:
        accelerator.wait_for_everyone()
        state_dict = consolidated_deepspeed_weights(tmp / STATE) if main else None
    else:
        state_dict = accelerator.get_state_dict(model)
    if main:
        write_weights(state_dict, tmp / WEIGHTS)
        (tmp / RECIPE).write_text(yaml.safe_dump(recipe_dict, sort_keys=False))
        save_tokenizer(tokenizer, accelerator.unwrap_model(model), tmp)
        (tmp / META).write_text(json.dumps(meta, indent=1, default=str))
        _fsync_tree(tmp)
        _swap_in(tmp, dst)
    accelerator.wait_for_everyone()


def link_or_copy(src: Path, dst: Path):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def promote(last: Path, best: Path, meta):
    """Make ``best`` a weights-only copy of ``last`` (hard links where possible). Main process only."""
    tmp = best.parent / f".{best.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in (WEIGHTS, RECIPE, VOCAB):
        if (last / name).exists():
            link_or_copy(last / name, tmp / name)
    if (last / TEXT_MODEL).is_dir():
        shutil.copytree(last / TEXT_MODEL, tmp / TEXT_MODEL)
    (tmp / META).write_text(json.dumps(meta, indent=1, default=str))
    _fsync_tree(tmp)
    _swap_in(tmp, best)


def read_meta(path):
    return json.loads((resolve(path) / META).read_text())


@contextmanager
def _unpartitioned_transformers():
    """Build whole models even inside a ZeRO-3 run: transformers partitions every model it creates
    while DeepSpeed's ZeRO-3 config is registered with it (a module global)."""
    try:
        import transformers.integrations.deepspeed as hfds
    except Exception:  # no transformers integration: nothing to undo
        yield
        return
    saved = getattr(hfds, "_hf_deepspeed_config_weak_ref", None)
    hfds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hfds._hf_deepspeed_config_weak_ref = saved


def load_for_eval(path, device="cpu"):
    """(model, tokenizer, recipe, meta) from a checkpoint; needs neither accelerate nor DeepSpeed."""
    from safetensors.torch import load_file

    from itr.config import recipe_from_dict
    from itr.models import build_model, make_tokenizer

    root = resolve(path)
    raw = yaml.safe_load((root / RECIPE).read_text())
    if (root / TEXT_MODEL).is_dir():
        raw["model"]["text"]["path"] = str(root / TEXT_MODEL)
    recipe = recipe_from_dict(raw)
    meta = json.loads((root / META).read_text())
    vocab = root / VOCAB
    tokenizer = make_tokenizer(recipe, vocab_file=vocab if vocab.is_file() else None)
    with _unpartitioned_transformers():
        model = build_model(recipe, meta["img_dim"], tokenizer)
    missing, unexpected = model.load_state_dict(load_file(str(root / WEIGHTS)), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{root / WEIGHTS} does not match the model of {root / RECIPE}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval(), tokenizer, recipe, meta
