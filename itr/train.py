"""The training loop, top to bottom: ``itr train RECIPE.yaml --out DIR [key=value ...]``.

Runs alike in one process and under ``accelerate launch -m itr train ...``.
``train.batch_size`` is the global batch of one optimizer step: each rank takes
``batch_size / (world * grad_accum)`` pairs per micro-step, so a recipe keeps the
paper's batch when only the launch changes.

Loss scale: the step's loss is the SUM over the global batch of per-query costs
(VSE++'s convention, which grad_clip=2.0 was tuned for). Negatives come from the whole
global batch: every rank's embeddings are gathered with gradients, and with gradient
accumulation the micro-batches are replayed so that the step equals one big batch
(``train_step``). DDP averages gradients over ranks, so each rank back-propagates
``world x`` its share.
"""
import json
import math
import os
import signal
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from itr import checkpoint as ckpt
from itr import rundir
from itr.config import ConfigError, to_dict
from itr.data.loader import TrainLoader
from itr.data.sources import data_kind, ensure_shards, load_split, split_captions
from itr.errors import DataError
from itr.distributed import (all_reduce_sum, check_world_size, deepspeed_config_path, fill_deepspeed_config,
                             is_distributed, make_accelerator, pad_cat)
from itr.eval.job import evaluate_model
from itr.eval.metrics import KEYS, format_table
from itr.models import build_model, make_tokenizer
from itr.models.base import embedding_keys, side_keys
from itr.optim import make_optimizer, set_lr
from itr.plots import recall_at_k, training_curves
from itr.precision import DTYPES, Precision
from itr.tracking import (JOURNAL, end_active, launch_info, make_tracker, memory_metrics, metric_prefix, recipe_params,
                          run_name, run_tags)


# Seconds to sleep after every optimizer step: a rehearsal aid that stretches a tiny run so that a
# preemption / time-limit signal lands mid-training (the SLURM tests use it; weights are unaffected).
STEP_DELAY = float(os.environ.get("ITR_STEP_DELAY", "0") or 0)


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


def _to(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train(recipe, out_dir):
    """Train ``recipe`` into ``out_dir``; returns results (None when stopped by a signal)."""
    stop = Stop()
    rundir.reset_faults()
    lock = None
    try:
        if int(os.environ.get("RANK", "0")) == 0:  # one `itr train` per run directory (rank 0 holds the lock)
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            lock = rundir.RunLock(out_dir)
        return _train(recipe, out_dir, stop)
    except BaseException as e:
        end_active("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")  # no MLflow run left RUNNING forever
        raise
    finally:
        stop.close()
        if lock is not None:
            lock.release()


def _train(recipe, out_dir, stop):
    rd = to_dict(recipe)
    out = Path(out_dir).resolve()
    t = recipe.train
    launched_world = int(os.environ.get("WORLD_SIZE", "1"))
    if t.batch_size % (launched_world * t.grad_accum):
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by {launched_world} ranks x "
                          f"train.grad_accum={t.grad_accum}")
    rank_batch = t.batch_size // (launched_world * t.grad_accum)
    ds_path = deepspeed_config_path(t.deepspeed)
    ds_config = fill_deepspeed_config(ds_path, rank_batch, t.grad_accum, launched_world, t.grad_clip,
                                      t.mixed_precision) if ds_path else None
    acc = make_accelerator(t.grad_accum, ds_config)
    world = check_world_size(acc, t.world_size)
    rank, main, device = acc.process_index, acc.is_main_process, acc.device
    deepspeed = ds_config is not None
    precision = Precision(t.mixed_precision, device, deepspeed)
    from accelerate.utils import set_seed

    set_seed(t.seed)
    if main:
        out.mkdir(parents=True, exist_ok=True)

    # ---- resume point: first undo whatever a kill left half-done (itr.rundir)
    if main:
        for name in ("last", "best"):
            did = rundir.recover(out / name)
            if did:
                print(f"[itr] {did}", flush=True)
    acc.wait_for_everyone()
    resume = None
    if t.resume == "latest":
        try:
            resume = ckpt.resolve(out / "last")
        except ckpt.CheckpointError:
            if main:
                print(f"[itr] resume=latest: no checkpoint in {out}, starting fresh", flush=True)
    elif t.resume:
        resume = ckpt.resolve(t.resume)
    meta = json.loads((resume / ckpt.META).read_text()) if resume else None
    if meta and meta["world_size"] != world:
        raise ConfigError(f"{resume} was written by {meta['world_size']} ranks; resume it with the same number "
                          f"(the data stream position depends on it), not {world}")

    # ---- data, tokenizer, model, optimizer
    manifest = ensure_shards(recipe.data, recipe.data.train_split, main, acc.wait_for_everyone, progress=main)
    dev = load_split(data_root(recipe), recipe.data.dev_split, recipe.data.image_size, verify=recipe.data.verify)
    check_test_split(recipe)  # a bad test split fails now, not after the whole training
    vocab = resume / ckpt.VOCAB if resume and (resume / ckpt.VOCAB).is_file() else None
    tokenizer = make_tokenizer(recipe, captions=None if vocab else split_captions(manifest), vocab_file=vocab)
    img_dim = manifest["feature_shape"][-1] if manifest.get("kind", "features") == "features" else 0  # 0: raw images
    model = build_model(recipe, img_dim, tokenizer)
    if deepspeed and t.mixed_precision != "no":
        # One dtype for every parameter before the engine sees them: transformers already loads the
        # text encoder in the DeepSpeed config's dtype, and ZeRO-3 partitions parameters as they are
        # (mixed dtypes fail in its "defragment"). ZeRO-1/2 would make the same cast themselves.
        model.to(DTYPES[t.mixed_precision])
    optimizer, optimizer_impl = make_optimizer(model.to(device), recipe.optim)
    if t.compile:
        model.compile()  # in place: the state dict keeps its names (no _orig_mod. prefix)
    model, optimizer = acc.prepare(model, optimizer)
    loader = TrainLoader(manifest, tokenizer, rank_batch, world, rank, t.seed, recipe.data.num_workers,
                         recipe.data.shuffle_buffer, recipe.data.image_size)

    state = {"epoch": 0, "micro_in_epoch": 0, "global_step": 0, "best": None, "best_epoch": None, "best_step": None,
             "run_id": None, "skipped_steps": 0, "best_dev": None, "pending_eval": False,
             "history": {"loss": [], "dev": []}}
    if resume:
        ckpt.load_training_state(acc, resume / ckpt.STATE, precision.scaler)
        state.update(meta["train_state"])
        if main and resume == out / "last":
            did = ckpt.reconcile_best(out, meta)
            if did:
                print(f"[itr] {did}", flush=True)
    dataset = recipe.data.name or Path(recipe.data.root).name
    tracker = make_tracker(recipe, main, run_id=state["run_id"], default_name=run_name(rd, dataset),
                           journal=out / JOURNAL)
    state["run_id"] = tracker.run_id
    tracker.log_params(recipe_params(rd))
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0) if deepspeed else None
    info = {"world_size": world, "rank_batch": rank_batch, "optimizer_impl": optimizer_impl,
            "precision": t.mixed_precision, "device": str(device), "img_dim": img_dim,
            "deepspeed": f"ZeRO-{zero_stage} ({ds_path})" if deepspeed else "no",
            "zero_stage": zero_stage if deepspeed else "none",
            "train_pairs": manifest["num_captions"], "vocab_size": len(tokenizer), "run_dir": str(out)}
    if main:
        tracker.set_tags({"model": rd["model"]["name"], "dataset": dataset, **info,
                          **run_tags(recipe.tracking, world, manifest)})
        (out / "launch.json").write_text(json.dumps(launch_info(), indent=1))  # argv, launcher and its environment
        tracker.log_artifact(out / "launch.json")
        print(f"[itr] {rd['model']['name']} on {dataset}: world {world} x batch {rank_batch} x accum {t.grad_accum}, "
              f"precision {t.mixed_precision}, optimizer {optimizer_impl}, device {device}, "
              f"deepspeed {info['deepspeed']}"
              + (f", resumed from {resume} at epoch {state['epoch']} step {state['global_step']}" if resume else ""),
              flush=True)

    def checkpoint_meta():
        return {"train_state": dict(state), "world_size": world, "img_dim": img_dim, "rank_batch": rank_batch,
                "grad_accum": t.grad_accum, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def save_last():
        ckpt.save(out / "last", acc, model, rd, tokenizer, checkpoint_meta(), deepspeed=deepspeed,
                  scaler=precision.scaler)

    def evaluate_dev():
        metrics, _ = evaluate_model(acc.unwrap_model(model), dev, tokenizer, recipe.eval, device, rank, world)
        return metrics

    def end_of_epoch(label):
        """Dev evaluation, then DIR/last, and DIR/best when the dev metric improved."""
        metrics = evaluate_dev()
        improved = False
        if main:
            score = metrics[recipe.eval.best_metric]
            improved = state["best"] is None or score > state["best"]
            if improved:
                state["best"], state["best_epoch"], state["best_dev"] = score, label, metrics
                state["best_step"] = state["global_step"]
            tracker.log_metrics({f"dev_{k}": metrics[k] for k in KEYS}, step=label)
            state["history"]["dev"].append([label, metrics])
            tqdm.write(format_table(metrics, f"dev after epoch {label} (best {recipe.eval.best_metric} "
                                             f"{state['best']:.1f} at epoch {state['best_epoch']})"))
        state["pending_eval"] = False
        save_last()
        if main and improved:
            ckpt.promote(out / "last", out / "best", checkpoint_meta())
        acc.wait_for_everyone()

    stopped_by = None
    loss_mean = acc.unwrap_model(model).loss_reduction == "mean"
    if state.get("pending_eval"):  # a signal arrived right after an epoch's last step
        end_of_epoch(state["epoch"])
    model.train()
    last_log, last_log_step = time.perf_counter(), state["global_step"]
    throughput, started = [], time.perf_counter()
    epoch_steps = [loader.num_batches(e) // t.grad_accum for e in range(t.epochs)]
    total_steps = sum(epoch_steps)
    for epoch in range(state["epoch"], t.epochs):
        steps = epoch_steps[epoch]
        first = state["micro_in_epoch"] // t.grad_accum
        batches = loader.epoch(epoch, skip=state["micro_in_epoch"])
        bar = tqdm(total=steps, initial=first, desc=f"epoch {epoch + 1}/{t.epochs}", disable=not main, unit="step")
        for _ in range(first, steps):
            lr = set_lr(optimizer, recipe.optim, epoch, state["global_step"], total_steps)
            micro_batches = [_to(next(batches), device) for _ in range(t.grad_accum)]
            loss_sum = train_step(model, micro_batches, epoch, acc, precision, world).float()
            precision.unscale_(optimizer)
            grad_norm = acc.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
            skipped = precision.step(optimizer)  # DeepSpeed stepped inside backward; this is then a no-op
            optimizer.zero_grad(set_to_none=True)
            if skipped or acc.optimizer_step_was_skipped:
                state["skipped_steps"] += 1  # fp16 overflow: the update was not applied
            state["global_step"] += 1
            state["micro_in_epoch"] += t.grad_accum
            bar.update(1)
            rundir.fault(f"step {state['global_step']}")
            if STEP_DELAY:
                time.sleep(STEP_DELAY)

            if state["global_step"] % t.log_every == 0:
                total = all_reduce_sum(loss_sum).item()
                per_pair = total if loss_mean else total / t.batch_size
                now = time.perf_counter()
                sps = (state["global_step"] - last_log_step) * t.batch_size / max(now - last_log, 1e-9)
                last_log, last_log_step = now, state["global_step"]
                bar.set_postfix(loss=f"{per_pair:.4f}", lr=f"{lr:.2g}", sps=f"{sps:.0f}")
                state["history"]["loss"].append([state["global_step"], per_pair])
                throughput.append(sps)
                if main:
                    tracker.log_metrics({"loss": per_pair, "lr": lr, "samples_per_sec": sps,
                                         "grad_norm": float(grad_norm if grad_norm is not None else math.nan),
                                         "epoch": epoch, "skipped_steps": state["skipped_steps"],
                                         **memory_metrics(device)}, step=state["global_step"])
                if not math.isfinite(total):
                    raise FloatingPointError(f"loss is {total} at step {state['global_step']}; "
                                             f"lower optim.lr or use train.mixed_precision=bf16/no")
            if t.checkpoint_every and state["global_step"] % t.checkpoint_every == 0:
                save_last()
            if stop.requested(device):
                stopped_by = "signal"
                break
            if t.max_steps and state["global_step"] >= t.max_steps:
                stopped_by = "max_steps"
                break
        bar.close()
        batches.close()
        done = state["micro_in_epoch"] >= steps * t.grad_accum
        if done:
            state["epoch"], state["micro_in_epoch"] = epoch + 1, 0
        if stopped_by == "signal":  # preemption: save now, evaluate after the restart
            state["pending_eval"] = done
            save_last()
            if main:
                print(f"[itr] stopped by signal {stop.signal} at step {state['global_step']}; "
                      f"resume with: itr train ... --out {out} train.resume=latest", flush=True)
            tracker.finish("KILLED")
            return None
        end_of_epoch(epoch + 1)
        if stopped_by:
            break

    # ---- the best checkpoint on the test split
    results = {"best_epoch": state["best_epoch"], "dev": state["best_dev"], "run_id": tracker.run_id,
               "experiment_id": tracker.experiment_id,
               "global_step": state["global_step"], "world_size": world, "optimizer_impl": optimizer_impl}
    test = final_test(recipe, out, device, rank, world)
    if main:
        if test is not None:
            results["test"] = test
            prefix = metric_prefix(recipe.data.test_split, recipe.eval.protocol)  # the key `itr eval --log-to-run` uses
            tracker.log_metrics({**{f"test_{k}": test[k] for k in KEYS}, **{f"{prefix}{k}": test[k] for k in KEYS}},
                                step=state["global_step"])
            print(format_table(test, f"test ({recipe.data.test_split}) with the best dev checkpoint, "
                                     f"protocol {recipe.eval.protocol}"), flush=True)
        rundir.write_text_atomic(out / "results.json", json.dumps(results, indent=1))
        (out / "recipe.yaml").write_text(yaml.safe_dump(rd, sort_keys=False))
        training_curves(state["history"], out / "curves.png", f"{rd['model']['name']} on {dataset}")
        recall_at_k({f"dev (best, epoch {state['best_epoch']})": state["best_dev"], recipe.data.test_split: test},
                    out / "recall_at_k.png", f"{rd['model']['name']} on {dataset}")
        tracker.log_metrics({"train_samples_per_sec": sum(throughput) / len(throughput) if throughput else math.nan,
                             "train_wall_s": time.perf_counter() - started, "epochs_completed": state["epoch"]},
                            step=state["global_step"])
        for name in ("recipe.yaml", "results.json", "curves.png", "recall_at_k.png"):
            tracker.log_artifact(out / name)
        if (out / "best").exists():
            tracker.log_checkpoint(ckpt.resolve(out / "best"), getattr(recipe.tracking, "max_artifact_mb", None))
        if tracker.run_id:
            print(f"[itr] MLflow run {tracker.run_id}: {tracker.ui_hint()}", flush=True)
    tracker.finish()
    acc.wait_for_everyone()
    return results


def data_root(recipe):
    """Evaluation splits come from the recipe's data.root (precomp or shards)."""
    from itr.config import resolve_path

    return resolve_path(recipe.data.root)


def check_test_split(recipe):
    """Open and check the test split before training (counts, checksums, finite features), if the data has one."""
    try:
        data_kind(data_root(recipe), recipe.data.test_split)
    except DataError:
        return
    load_split(data_root(recipe), recipe.data.test_split, recipe.data.image_size, verify=recipe.data.verify)


def final_test(recipe, out, device, rank, world):
    """Evaluate DIR/best on the test split (every rank embeds a slice), if the data has one."""
    root = data_root(recipe)
    try:
        data_kind(root, recipe.data.test_split)
    except DataError:
        if rank == 0:
            print(f"[itr] no {recipe.data.test_split!r} split in {root}: skipping the test evaluation", flush=True)
        return None
    model, tokenizer, _, _ = ckpt.load_for_eval(out / "best", device)
    split = load_split(root, recipe.data.test_split, recipe.data.image_size, verify=recipe.data.verify)
    metrics, _ = evaluate_model(model, split, tokenizer, recipe.eval, device, rank, world)
    return metrics
