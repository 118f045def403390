"""What the launcher asked for, checked against the recipe before anything is built.

The recipe's ``train.mixed_precision`` is the one source of truth for precision: a launcher that asks for
another (``accelerate launch --mixed_precision bf16``, a launch config's or the default ``accelerate config``'s
``mixed_precision``, a DeepSpeed JSON's ``bf16`` / ``fp16`` sections) stops the run with both values and how
to reconcile them, instead of training in one precision while the recipe and MLflow record another.

A launch config's ``deepspeed_config_file`` is read relative to the launch YAML (accelerate itself would take
it relative to the current directory, which breaks as soon as a job runs elsewhere); a relative
``--deepspeed_config_file`` on the command line stays relative to the current directory.
"""
import json
import os
from pathlib import Path

from itr.errors import ConfigError, LaunchError

PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"
CHOICES = ("no", "bf16", "fp16")


def check_launcher_precision(recipe_mp):
    """Stop when the launcher asked for a precision other than the recipe's.

    ``accelerate launch`` always exports ``ACCELERATE_MIXED_PRECISION``, ``no`` when neither its flag nor a
    config names one (accelerate/commands/launch.py, ``_validate_launch_command``), so ``no`` cannot be told
    apart from "not asked" and is accepted with any recipe: the Accelerator is given the precision
    explicitly (``itr.distributed.make_accelerator``), never from this variable."""
    launched = os.environ.get(PRECISION_ENV, "").strip().lower()
    if launched not in ("", "no", recipe_mp):
        fix = f"set train.mixed_precision={launched}, or " if launched in CHOICES else ""
        raise LaunchError(
            f"the launcher asked for mixed precision {launched} ({PRECISION_ENV}={launched}: `accelerate launch "
            f"--mixed_precision {launched}`, the launch config's mixed_precision, or your default `accelerate "
            f"config`) but the recipe says train.mixed_precision={recipe_mp}; the recipe decides: {fix}launch with "
            f"--mixed_precision {recipe_mp} (or unset {PRECISION_ENV})")
    # accelerate refuses a launch config that sets mixed_precision beside deepspeed_config_file
    # (ACCELERATE_CONFIG_DS_FIELDS): it agrees with the recipe, which fills the JSON, so nothing is left to refuse
    fields = os.environ.get("ACCELERATE_CONFIG_DS_FIELDS")
    if fields and "mixed_precision" in fields.split(","):
        os.environ["ACCELERATE_CONFIG_DS_FIELDS"] = ",".join(f for f in fields.split(",") if f != "mixed_precision")


def deepspeed_config_path(recipe_value):
    """The DeepSpeed JSON to use: the recipe's ``train.deepspeed``, else the one `accelerate launch` was given
    (resolved as the module docstring says)."""
    if recipe_value:
        return recipe_value
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or path == "none":
        raise LaunchError("accelerate launch --use_deepspeed needs --deepspeed_config_file (see launch/README.md)")
    relative = not Path(os.path.expandvars(os.path.expanduser(path))).is_absolute()
    return resolve_launch_deepspeed_file(path, launch_args() if relative else None)


def resolve_launch_deepspeed_file(path, launch):
    """``path`` (accelerate's ``ACCELERATE_DEEPSPEED_CONFIG_FILE``) as a file that exists. ``launch``: the
    launcher's parsed arguments and working directory (``launch_args()``), or None when unknown."""
    p = Path(os.path.expandvars(os.path.expanduser(path)))
    if p.is_absolute():
        if p.is_file():
            return str(p)
        raise ConfigError(f"DeepSpeed config {p} (deepspeed_config_file of the launch) does not exist")
    tried, origin = [], "ACCELERATE_DEEPSPEED_CONFIG_FILE"
    if launch is not None:
        args, cwd = launch
        config = Path(cwd, os.path.expanduser(args.config_file)) if args.config_file else _default_accelerate_config()
        if args.deepspeed_config_file:  # given on the command line: relative to where it was typed
            origin = "--deepspeed_config_file"
        elif config is not None:
            origin = f"deepspeed_config_file of the launch config {config}"
            tried.append(config.parent / p)
        tried.append(Path(cwd) / p)
    tried.append(Path.cwd() / p)
    tried = list(dict.fromkeys(t.resolve() for t in tried))
    for t in tried:
        if t.is_file():
            return str(t)
    unknown = "" if launch is not None else " (the accelerate launch that started this process was not found, " \
                                            "so the launch YAML's folder could not be tried)"
    raise ConfigError(f"DeepSpeed config {path} ({origin}) does not exist: looked for "
                      f"{' and '.join(map(str, tried))}{unknown}; give a path relative to the launch YAML, or an "
                      f"absolute one")


def _default_accelerate_config():
    from accelerate.commands.config import default_config_file

    return Path(default_config_file) if os.path.isfile(default_config_file) else None


def launch_args():
    """(arguments, working directory) of the ``accelerate launch`` that started this process, found among its
    ancestors through /proc (Linux); None when there is none (torchrun, the deepspeed launcher, a plain run)."""
    pid = os.getppid()
    for _ in range(8):
        if pid <= 1:
            return None
        try:
            argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
            cwd = os.readlink(f"/proc/{pid}/cwd")
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None
        rest = _after_launch(argv)
        if rest is not None:
            from accelerate.commands.launch import launch_command_parser

            try:
                return launch_command_parser().parse_known_args(rest)[0], cwd
            except SystemExit:
                return None
        pid = parent
    return None


def _after_launch(argv):
    """The arguments after ``accelerate launch`` (or ``accelerate-launch``) in a command line, else None."""
    for i, a in enumerate(argv):
        name = os.path.basename(a)
        if name == "accelerate-launch" or a == "accelerate.commands.launch":
            return argv[i + 1:]
        if name in ("accelerate", "accelerate.commands.accelerate_cli") and argv[i + 1:i + 2] == ["launch"]:
            return argv[i + 2:]
    return None


def fill_deepspeed_config(path, rank_batch, grad_accum, world, grad_clip, mixed_precision):
    """Read a DeepSpeed JSON and replace its "auto" values with the recipe's.

    Our own values win where the file sets them explicitly and they disagree, with an
    error: a batch size or a precision in the launch config that differs from the recipe is a mistake.
    """
    p = os.path.expandvars(os.path.expanduser(str(path)))
    try:
        cfg = json.loads(open(p).read())
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON ({e})") from None
    want = {
        "train_micro_batch_size_per_gpu": rank_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": rank_batch * grad_accum * world,
        "gradient_clipping": grad_clip,
    }
    for key, value in want.items():
        have = cfg.get(key, "auto")
        if have != "auto" and have != value:
            raise ConfigError(f"{path}: {key}={have} but the recipe gives {value}; set it to \"auto\"")
        cfg[key] = value
    for mode in ("bf16", "fp16"):
        section = cfg.setdefault(mode, {})
        enabled = mixed_precision == mode
        have = section.get("enabled", "auto")
        if have != "auto" and have != enabled:
            fix = f"set train.mixed_precision={mode}, or " if have is True else ""
            raise ConfigError(
                f"DeepSpeed config {path}: {mode}.enabled={json.dumps(have)} but the recipe says "
                f"train.mixed_precision={mixed_precision}; the recipe decides: {fix}set {mode}.enabled to \"auto\" "
                f"in {path} (the recipe fills it)")
        section["enabled"] = enabled
    cfg.setdefault("zero_allow_untested_optimizer", True)  # we pass a torch optimizer (no fused_adam build)
    return cfg
