"""Process-group setup and the few collectives the trainer and the eval job use.

On CPU the backend is gloo. Misconfigured launches are loud here: accelerate can start
N processes that each believe they are alone (``--multi_gpu`` without
``ACCELERATE_USE_CPU=true`` on a CPU box) or silently start one (``--cpu
--num_processes 2``); both are caught by comparing the world size we got with the
launcher's ``WORLD_SIZE`` and with ``train.world_size``.
"""
import os

import torch
import torch.distributed as dist


from itr.errors import LaunchError  # noqa: F401  (re-exported)


def make_accelerator(mixed_precision="no", cpu=None):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if cpu is None:
        cpu = not torch.cuda.is_available()
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if cpu and launched else []
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu, kwargs_handlers=handlers)


def check_world_size(accelerator, expected=0):
    got = accelerator.num_processes
    env = int(os.environ.get("WORLD_SIZE", "1"))
    if env != got:
        raise LaunchError(
            f"the launcher started WORLD_SIZE={env} processes but this one sees a world of {got}. "
            f"On CPU launch with: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N -m itr train ... "
            f"(or torchrun --nproc_per_node N -m itr train ...)"
        )
    if expected and expected != got:
        raise LaunchError(f"train.world_size={expected} but {got} process(es) were started "
                          f"(note: `accelerate launch --cpu --num_processes N` starts only one)")
    return got


def shard_range(n, rank, world):
    """Contiguous slice [lo, hi) of n items for ``rank`` (sizes differ by at most one)."""
    lo = n * rank // world
    return lo, n * (rank + 1) // world


def gather_rows(x, n_total, world):
    """Concatenate each rank's contiguous ``shard_range`` rows of a (rows, ...) tensor, on every rank."""
    if world == 1:
        return x
    size = -(-n_total // world)
    pad = torch.zeros((size - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    parts = [torch.empty((size, *x.shape[1:]), dtype=x.dtype, device=x.device) for _ in range(world)]
    dist.all_gather(parts, torch.cat([x, pad]).contiguous())
    return torch.cat([p[: hi - lo] for p, (lo, hi) in zip(parts, (shard_range(n_total, r, world) for r in range(world)))])


def all_reduce_sum(x):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x
