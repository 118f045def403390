"""One optimizer step of the trainer, exact under gradient accumulation, and the stop signal it checks.

``train_step`` is the heart of ``itr.train``: forward and backward of one optimizer step, the micro-batches of
gradient accumulation replayed so that the step equals one big batch. ``Stop`` turns SIGTERM / SIGUSR1
(preemption, time limits) into a checkpoint at the next step, agreed by every rank.
"""
import signal

import torch

from itr.distributed import is_distributed, pad_cat
from itr.models.base import embedding_keys, side_keys


class Stop:
    """Set by SIGTERM / SIGUSR1 (preemption, time limits): checkpoint at the next step and exit."""

    def __init__(self):
        self.signal = None
        self._previous = {}
        for s in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._previous[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread
                pass

    def close(self):
        for s, h in self._previous.items():
            signal.signal(s, h)

    def _handler(self, signum, frame):
        self.signal = signum

    def requested(self, device):
        """True on every rank at the same step once any rank got a signal.

        With several ranks the flags are summed by an all-reduce started one step earlier and
        collected now, so the check never blocks a step (a stop comes one step later)."""
        if not is_distributed():
            return self.signal is not None
        flag = torch.tensor([1.0 if self.signal else 0.0], device=device)
        pending, self._pending = getattr(self, "_pending", None), (flag, torch.distributed.all_reduce(flag, async_op=True))
        if pending is None:
            return False
        pending[1].wait()
        return bool(pending[0].item() > 0)


def _rng_state():
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _set_rng_state(state):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def train_step(model, micro_batches, epoch, acc, precision, world):
    """Forward and backward of one optimizer step; returns this rank's share of the loss.

    One micro-batch: the model embeds it and returns the loss of this rank's queries
    against the global batch; backward. Several (gradient accumulation), exactly as one big
    batch (GradCache, Gao et al. 2021):

    1. embed every micro-batch without a graph (remembering its RNG state);
    2. the loss of the whole accumulated batch on those embeddings, and its gradient with
       respect to them;
    3. replay each micro-batch but the last with a graph and back-propagate that gradient;
    4. replay the last one through the loss of the whole batch, its own rows live: exact for
       it and for any learnable batch-level module (HREM, SelfAlign).

    Replays restore each micro-batch's RNG state, so dropout masks match. Cost: one extra
    forward pass per micro-batch. Per-micro-batch ``aux_loss`` terms are added in the replays.
    """
    if len(micro_batches) == 1:
        batch = micro_batches[0]
        with acc.accumulate(model):
            with precision.autocast():
                loss = model(batch, epoch=epoch)["loss"]
            acc.backward(precision.scale(loss * world))
        return loss.detach()
    A = len(micro_batches)
    core = acc.unwrap_model(model)
    states, embs = [], []
    with torch.no_grad():
        for b in micro_batches:
            states.append(_rng_state())
            with precision.autocast():
                embs.append(core.embed(b))
    keys = embedding_keys(embs[0])
    cached = {k: pad_cat([e[k].float() for e in embs]).requires_grad_() for k in keys}
    cached.update({k: pad_cat([e[k] for e in embs]) for k in side_keys(embs[0])})
    img_ids = torch.cat([b["img_ids"] for b in micro_batches])
    loss = core.batch_loss(cached, img_ids, epoch)
    grads = dict(zip(keys, torch.autograd.grad(loss * world, [cached[k] for k in keys])))
    context = {"emb": {k: v.detach() for k, v in cached.items()}, "img_ids": img_ids}
    start, aux = 0, 0.0
    for i, (b, state) in enumerate(zip(micro_batches, states)):
        n = len(b["img_ids"])
        _set_rng_state(state)
        with acc.accumulate(model):
            with precision.autocast():
                if i < A - 1:
                    out = model(b, epoch=epoch, mode="embed")
                    total = sum((out[k].float() * _rows_like(grads[k], start, out[k])).sum() for k in keys) / world
                    total = total + out.get("aux_loss", 0.0)
                else:
                    out = model(b, epoch=epoch, context={**context, "rows": (start, start + n)})
                    total = out["loss"]
            if "aux_loss" in out:
                aux = aux + out["aux_loss"].detach()
            acc.backward(precision.scale(total * world * A))  # accelerate / DeepSpeed divide by A
        start += n
    return loss.detach() + aux


def _rows_like(g, start, like):
    """This micro-batch's rows of a (padded) whole-batch gradient, cut to the micro-batch's own shape."""
    return g[(slice(start, start + like.shape[0]),) + tuple(slice(0, d) for d in like.shape[1:])]


def move_to(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
