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
from itr.launcher import deepspeed_config_path, fill_deepspeed_config  # noqa: F401  (re-exported)


def make_accelerator(grad_accum=1, deepspeed_config=None, cpu=None):
    """An Accelerator for DDP (or one process), or for DeepSpeed when ``deepspeed_config`` is a dict.

    Mixed precision is not accelerate's job here (see ``itr.precision``): accelerate silently
    runs fp16 in fp32 on a CPU, and its own autocast and loss scaler would come on top of ours. So it is
    told ``no`` explicitly, never left to read ``ACCELERATE_MIXED_PRECISION`` (``itr.launcher`` checks that
    against the recipe). Under DeepSpeed, precision lives in the DeepSpeed config, which the recipe filled.
    """
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    if cpu is None:
        cpu = not torch.cuda.is_available()
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if cpu and (launched or deepspeed_config) else []
    if deepspeed_config is None:
        return Accelerator(cpu=cpu, mixed_precision="no", gradient_accumulation_steps=grad_accum,
                           kwargs_handlers=handlers)
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.pop("ACCELERATE_USE_CPU", None)  # it would make accelerate drop DeepSpeed without a word
    mp = "bf16" if deepspeed_config.get("bf16", {}).get("enabled") else "fp16" if deepspeed_config.get("fp16", {}).get("enabled") else "no"
    # zero3_init_flag=False: build the model whole on each rank, then let the engine partition it.
    # Under zero.Init, transformers would create the text encoder already partitioned next to our
    # unpartitioned heads; the models here (at most BERT-base size) fit on one device anyway.
    plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config, zero3_init_flag=False)
    acc = Accelerator(deepspeed_plugin=plugin, mixed_precision=mp, gradient_accumulation_steps=grad_accum,
                      kwargs_handlers=handlers)
    if acc.distributed_type.name != "DEEPSPEED":
        raise LaunchError(f"a DeepSpeed config was given but accelerate set up {acc.distributed_type.name}")
    return acc


def init_job():
    """(rank, world, device) for a plain torch.distributed job (the evaluation job): joins the process
    group when started by a launcher (WORLD_SIZE > 1), with NCCL on GPUs and gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if world > 1 and dist.get_world_size() != world:
        raise LaunchError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} ranks")
    return (dist.get_rank() if world > 1 else 0), world, device


def finish_job():
    """Wait for every rank, then leave the process group (a rank that exits while gloo's threads run aborts)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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


def comm_device():
    """Where a collective's tensors must live: this rank's GPU under NCCL (it takes no host tensors), else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def host_collective(op, t, *args, **kwargs):
    """``op(t, ...)`` (an in-place torch.distributed collective) on a host tensor, through the comm device.
    The evaluation job keeps scores and shortlists on the host; under NCCL they go to the GPU and back."""
    dev = comm_device()
    if dev.type == "cpu":
        op(t, *args, **kwargs)
        return t
    x = t.to(dev)
    op(x, *args, **kwargs)
    t.copy_(x.cpu())
    return t


def all_reduce_sum(x):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient into the owner's slice.

    Works on gloo (no reduce_scatter there): the backward all-reduces the full gradient
    and keeps this rank's rows. OpenCLIP's gather_with_grad, written out.
    """

    @staticmethod
    def forward(ctx, x):
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x):
    """(n, ...) on each rank -> (world * n, ...) on every rank, rank order, differentiable."""
    return _GatherWithGrad.apply(x) if is_distributed() else x


def gather_no_grad(x):
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def pad_to(x, shape):
    """Zero-pad ``x`` at the end of every dimension after the first up to ``shape[1:]``: token-level
    embeddings of different caption lengths (cross-attention models) become one tensor; the model's
    own lengths mask the padding."""
    pad = []
    for have, want in zip(reversed(x.shape[1:]), reversed(shape[1:])):
        pad += [0, want - have]
    return torch.nn.functional.pad(x, pad) if any(pad) else x


def pad_cat(xs):
    """``torch.cat`` along the batch of tensors whose later dimensions may differ (padded to the max)."""
    shape = [max(s) for s in zip(*(x.shape for x in xs))]
    return torch.cat([pad_to(x, shape) for x in xs])


def global_max_shape(x):
    """The elementwise max of ``x.shape`` over ranks (to pad before a gather)."""
    if not is_distributed():
        return list(x.shape)
    s = torch.tensor(list(x.shape), dtype=torch.long, device=x.device)
    dist.all_reduce(s, op=dist.ReduceOp.MAX)
    return s.tolist()


def gather_padded(x, grad=True):
    """Gather tensors whose later dimensions differ across ranks (e.g. (n, L, d) word features),
    zero-padded to the largest; differentiable when ``grad``."""
    if not is_distributed():
        return x
    x = pad_to(x, global_max_shape(x))
    return gather_with_grad(x) if grad else gather_no_grad(x)
