"""Checkpoints: ``DIR/last`` (weights + full training state) and ``DIR/best`` (weights).

A checkpoint directory holds ``model.safetensors`` (unwrapped, consolidated weights),
``recipe.yaml``, ``itr.json`` (epoch, step, metrics, MLflow run), the tokenizer
(``vocab.json``, or ``text_model/`` with a transformers config and tokenizer), and for
``last`` the training state under ``state/``: accelerate's (optimizer; DeepSpeed's partitions)
and this module's own ``rng_{rank}.safetensors`` (every RNG, and the fp16 loss scale as JSON).
``itr eval`` needs only the first four and imports neither accelerate nor DeepSpeed.

Writes follow the run-directory protocol of ``itr.rundir`` (a kill at any instant leaves the old or the
new checkpoint). Nothing is unpickled freely on resume: every ``torch.load`` accelerate or DeepSpeed
makes runs with ``weights_only=True`` (``weights_only_loads``), and what a checkpoint needs beyond
tensors (RNG states, the loss scale) is written here as safetensors and JSON.
"""
import json
import os
import pickle
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import yaml

from itr import checkpoint_files, rundir
from itr.checkpoint_files import PICKLE_SUFFIXES
from itr.errors import CheckpointError  # noqa: F401  (re-exported)

META, WEIGHTS, RECIPE, VOCAB, TEXT_MODEL, STATE = "itr.json", "model.safetensors", "recipe.yaml", "vocab.json", "text_model", "state"
check_files = checkpoint_files.check


def resolve(path) -> Path:
    """A checkpoint directory; accepts a run directory (uses its ``best``, else ``last``). A checkpoint whose
    save a kill interrupted between its two renames is found at ``.NAME.tmp`` (newer) or ``.NAME.old``."""
    p = Path(path)
    if (p / META).is_file():
        return p
    _, tmp, old = rundir.paths(p)
    for cand in (tmp, old):
        if (cand / META).is_file():
            return cand
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


def save(dst, accelerator, model, recipe_dict, tokenizer, meta, with_state=True, deepspeed=False, scaler=None,
         extra=None):
    """Atomically write a checkpoint at ``dst``. Collective: call on every rank.

    Under DeepSpeed the weights are the fp32 master weights consolidated from the ZeRO
    partitions (DeepSpeed's zero_to_fp32), so ``itr eval`` reads one safetensors file.
    A full disk (or any write error) removes the partial ``.NAME.tmp`` and says so; ``dst`` stays as it was.
    ``extra``: more state dicts (file name -> tensors) written beside the weights, e.g. the EMA (``itr.aids``).
    """
    dst, tmp, _ = rundir.paths(dst)
    main = accelerator.is_main_process
    if main:
        rundir.trash(tmp)
        tmp.mkdir(parents=True)
        rundir.fault(f"{dst.name}: tmp cleared")
    accelerator.wait_for_everyone()
    try:
        if with_state or deepspeed:
            accelerator.save_state(str(tmp / STATE), safe_serialization=True)
            save_rng(tmp / STATE, accelerator.process_index, scaler)
            # every rank's files are in before rank 0 fsyncs and renames the folder (without this, a slow rank
            # wrote into a folder being walked or already committed)
            accelerator.wait_for_everyone()
        if deepspeed:
            state_dict = consolidated_deepspeed_weights(tmp / STATE) if main else None
        else:
            state_dict = accelerator.get_state_dict(model)
        if main:
            write_weights(state_dict, tmp / WEIGHTS)
            for name, sd in (extra or {}).items():
                write_weights(sd, tmp / name)
            (tmp / RECIPE).write_text(yaml.safe_dump(recipe_dict, sort_keys=False))
            save_tokenizer(tokenizer, accelerator.unwrap_model(model), tmp)
            (tmp / META).write_text(json.dumps(meta, indent=1, default=str))
            rundir.fsync_tree(tmp)
    except Exception as e:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) or "No space left" in str(e) or "os error" in str(e):
            raise CheckpointError(f"writing the checkpoint {tmp} failed ({type(e).__name__}: {e}); the partial folder "
                                  f"was removed and {dst} is as it was. Free disk space, then resume with "
                                  f"train.resume=latest") from None
        raise
    if main:
        rundir.commit(tmp, dst)
    accelerator.wait_for_everyone()


def link_or_copy(src: Path, dst: Path):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def promote(last: Path, best: Path, meta, weights=WEIGHTS):
    """Make ``best`` a weights-only copy of ``last`` (hard links where possible), its weights taken from
    ``last/weights`` (the EMA's for ``best_ema``). Main process only."""
    best, tmp, _ = rundir.paths(best)
    rundir.trash(tmp)
    tmp.mkdir(parents=True)
    rundir.fault(f"{best.name}: tmp cleared")
    for src, name in ((weights, WEIGHTS), (RECIPE, RECIPE), (VOCAB, VOCAB)):
        if (last / src).exists():
            link_or_copy(last / src, tmp / name)
    if (last / TEXT_MODEL).is_dir():
        shutil.copytree(last / TEXT_MODEL, tmp / TEXT_MODEL)
    (tmp / META).write_text(json.dumps(meta, indent=1, default=str))
    rundir.fsync_tree(tmp)
    rundir.commit(tmp, best)


def reconcile_best(run_dir, last_meta):
    """Make ``best`` what ``last``'s training state says it is; main process only, before a resume goes on.

    ``last`` records a new best before ``best`` is promoted from it; a kill between the two leaves ``best``
    older than the state (or missing). Then ``last`` still holds the best's weights (nothing rewrites it before
    the promotion), and promoting it again is exact. Returns what it did, for the log."""
    ts = last_meta["train_state"]
    if ts.get("best") is None:
        return None
    best = Path(run_dir) / "best"
    want = ts.get("best_step")  # None: written before best_step existed
    have = json.loads((best / META).read_text())["train_state"]["global_step"] if (best / META).is_file() else None
    if have is not None and want in (None, have):
        return None
    if want not in (None, ts["global_step"]):
        raise CheckpointError(f"{best} holds step {have} but {Path(run_dir) / 'last'} names step {want} as the best "
                              f"and is at step {ts['global_step']}: the run directory was changed by hand")
    promote(Path(run_dir) / "last", best, last_meta)
    return f"{best} was behind the training state (a kill during its promotion): promoted again from last"


# ----------------------------------------------------------------------------- training state without pickle


def save_rng(state_dir, rank, scaler=None):
    """Every RNG of this rank (torch CPU and CUDA, numpy, Python) and the fp16 loss scale, as safetensors + JSON."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, py, gauss_next = random.getstate()
    info = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [version, list(py), gauss_next],
            "scaler": scaler.state_dict() if scaler is not None else None}
    save_file(tensors, str(Path(state_dir) / f"rng_{rank}.safetensors"), metadata={"itr": json.dumps(info)})


def load_rng(state_dir, rank, scaler=None):
    """Restore what ``save_rng`` wrote; False for a checkpoint written before it existed (RNG from accelerate's file)."""
    import numpy as np
    import torch
    from safetensors import safe_open

    path = Path(state_dir) / f"rng_{rank}.safetensors"
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            info = json.loads(f.metadata()["itr"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda_{i}"] for i in range(len([k for k in tensors if k.startswith("cuda_")]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = info["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py, gauss_next = info["python"]
    random.setstate((version, tuple(py), gauss_next))
    if scaler is not None and info.get("scaler"):
        scaler.load_state_dict(info["scaler"])
    return True


def _deepspeed_globals():
    """The non-tensor classes DeepSpeed's own checkpoint files hold (allowed for weights_only loading)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except Exception:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loads():
    """Every ``torch.load`` inside runs with ``weights_only=True``, whatever its caller asked (accelerate loads
    registered objects, DeepSpeed its partitions, with ``weights_only=False``)."""
    import torch.serialization

    saved = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            yield
    finally:
        if saved is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = saved


def unloadable(state_dir):
    """(file, error) of the first pickle under ``state_dir`` that weights-only loading cannot load, else None."""
    from accelerate.utils import load

    with weights_only_loads():
        for p in sorted(Path(state_dir).rglob("*")):
            if p.is_file() and p.suffix in PICKLE_SUFFIXES:
                try:
                    load(str(p), map_location="cpu")
                except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError) as e:
                    return p, e
    return None


def load_training_state(accelerator, state_dir, scaler=None):
    """accelerate's ``load_state`` with weights-only unpickling, then this module's RNG and loss-scale files.
    A file holding anything but tensors and plain containers is refused, naming it; a damaged (truncated) file is
    named as such, before anything is loaded."""
    checkpoint_files.check(state_dir, Path(state_dir).parent)
    try:
        with weights_only_loads():
            accelerator.load_state(str(state_dir))
    except Exception as e:
        bad = unloadable(state_dir)
        if bad is None:
            raise
        path, err = bad
        found = re.search(r"GLOBAL ([\w.]+)", str(err))  # weights-only unpickling met a class: planted
        if not found:
            why = f"{type(err).__name__}: {str(err)[:200]}"
            raise checkpoint_files.damaged(path, why, Path(state_dir).parent) from e
        raise CheckpointError(f"refusing to unpickle {path}: it holds more than tensors (the global {found.group(1)}). "
                              f"A checkpoint written by itr never does; was the file replaced?") from e
    if load_rng(state_dir, accelerator.process_index, scaler):
        return
    if (Path(state_dir) / "rng_0.safetensors").is_file():
        # a rank the writing run did not have (resumed on more ranks): a fresh RNG, rank 0's loss scale (every
        # rank must unscale the all-reduced gradients alike)
        _load_scaler(Path(state_dir) / "rng_0.safetensors", scaler)
    elif scaler is not None:
        import warnings

        warnings.warn(f"{state_dir} predates itr's own training-state file: the fp16 loss scale starts afresh")


def _load_scaler(path, scaler):
    from safetensors import safe_open

    if scaler is None:
        return
    with safe_open(str(path), "pt") as f:
        info = json.loads(f.metadata()["itr"])
    if info.get("scaler"):
        scaler.load_state_dict(info["scaler"])


def read_meta(path):
    return json.loads((resolve(path) / META).read_text())


def load_weights_into(model, path):
    """Initialise ``model`` from a checkpoint's weights (``train.init_from``); every key must match."""
    root = resolve(path)
    missing, unexpected = model.load_state_dict(read_weights(root / WEIGHTS), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"train.init_from={path}: {root / WEIGHTS} does not match the recipe's model: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]} (use that checkpoint's recipe.yaml)")


def read_weights(path):
    """The state dict of a ``model.safetensors``; a truncated or corrupt file is named."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e}); the checkpoint is damaged "
                              f"(truncated copy?). Use another checkpoint, e.g. DIR/last") from None


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
    missing, unexpected = model.load_state_dict(read_weights(root / WEIGHTS), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{root / WEIGHTS} does not match the model of {root / RECIPE}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval(), tokenizer, recipe, meta
