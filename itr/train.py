"""The training loop, top to bottom: ``itr train RECIPE.yaml --out DIR [key=value ...]``.

Runs alike in one process and under ``accelerate launch -m itr train ...``.
``train.batch_size`` is the global batch of one optimizer step: each rank takes
``batch_size / (world * grad_accum)`` pairs per micro-step, so a recipe keeps the
paper's batch when only the launch changes.

Loss scale: the step's loss is the SUM over the global batch of per-query costs
(VSE++'s convention, which grad_clip=2.0 was tuned for). Negatives come from the whole
global batch: every rank's embeddings are gathered with gradients, and with gradient
accumulation the micro-batches are replayed so that the step equals one big batch
(``itr.step.train_step``). DDP averages gradients over ranks, so each rank back-propagates
``world x`` its share.

A run is a ``Trainer`` going through named phases (torchtune's recipe shape): ``setup`` (accelerator, data,
model, optimizer, tracking), ``resume``, ``train`` (``run_epoch`` and ``end_of_epoch`` per epoch),
``save_checkpoint``, ``finish`` (the test evaluation, results and artifacts), ``cleanup``. What survives a
restart is one ``TrainState`` (``itr.train_state``); how the run directory is written, ``itr.rundir``.
"""
import json
import math
import os
import time
from pathlib import Path

from tqdm import tqdm

from itr import checkpoint as ckpt
from itr import progress
from itr import rundir, train_tracking
from itr.aids import BEST_EMA, Aids, promote_ema, reconcile_best_ema
from itr.config import ConfigError, to_dict
from itr.data.loader import TrainLoader
from itr.data.segments import begin_segment, stream_shape
from itr.data.sources import check_split, data_root, ensure_shards, load_split, split_captions
from itr.distributed import (all_reduce_sum, check_world_size, deepspeed_config_path, fill_deepspeed_config,
                             make_accelerator)
from itr.eval.job import evaluate_model, final_test
from itr.eval.metrics import format_table
from itr.launcher import check_launcher_precision
from itr.models import build_model, make_tokenizer
from itr.optim import make_optimizer, set_lr
from itr.precision import DTYPES, Precision
from itr.step import Stop, move_to, train_step
from itr.tracking import end_active, memory_metrics
from itr.train_state import TrainState

# Seconds to sleep after every optimizer step of a run that did not resume: a rehearsal aid that stretches a
# tiny run so that a preemption / time-limit signal lands mid-training (the SLURM tests use it; weights are
# unaffected); the resumed run, which nothing interrupts, goes at full speed.
STEP_DELAY = float(os.environ.get("ITR_STEP_DELAY", "0") or 0)


def train(recipe, out_dir):
    """Train ``recipe`` into ``out_dir``; returns results (None when stopped by a signal)."""
    run = Trainer(recipe, out_dir)
    try:
        run.setup()
        run.resume()
        if run.train() == "signal":
            return None
        return run.finish()
    except BaseException as e:
        end_active("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")  # no MLflow run left RUNNING forever
        raise
    finally:
        run.cleanup()


class Trainer:
    def __init__(self, recipe, out_dir):
        self.recipe, self.t = recipe, recipe.train
        self.rd = to_dict(recipe)
        self.out = Path(out_dir).resolve()
        self.stop = Stop()
        self.lock = None
        self.state = TrainState()
        self.dataset = recipe.data.name or Path(recipe.data.root).name
        rundir.reset_faults()

    # ------------------------------------------------------------------ setup

    def setup(self):
        """Lock the run directory, start the accelerator, undo what a kill left half-done, find the checkpoint to
        resume, then build data, model, optimizer and tracking (this order fixes the RNG stream)."""
        if int(os.environ.get("RANK", "0")) == 0:  # one `itr train` per run directory (rank 0 holds the lock)
            self.out.mkdir(parents=True, exist_ok=True)
            self.lock = rundir.RunLock(self.out)
        self._accelerator()
        if self.main:
            for name in ("last", "best", BEST_EMA):
                self._say(rundir.recover(self.out / name))
        self.acc.wait_for_everyone()
        self._find_resume()
        self._build()
        self.loader = TrainLoader(self.manifest, self.tokenizer, self.rank_batch, self.world, self.rank, self.t.seed,
                                  self.recipe.data.num_workers, self.recipe.data.shuffle_buffer,
                                  self.recipe.data.image_size, self.recipe.data.on_error)

    def _accelerator(self):
        t = self.t
        launched_world = int(os.environ.get("WORLD_SIZE", "1"))
        if t.batch_size % (launched_world * t.grad_accum):
            raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by {launched_world} ranks x "
                              f"train.grad_accum={t.grad_accum}")
        self.rank_batch = t.batch_size // (launched_world * t.grad_accum)
        check_launcher_precision(t.mixed_precision)
        self.ds_path = deepspeed_config_path(t.deepspeed)
        self.ds_config = fill_deepspeed_config(self.ds_path, self.rank_batch, t.grad_accum, launched_world,
                                               t.grad_clip, t.mixed_precision) if self.ds_path else None
        self.deepspeed = self.ds_config is not None
        self.acc = make_accelerator(t.grad_accum, self.ds_config)
        self.world = check_world_size(self.acc, t.world_size)
        self.rank, self.main, self.device = self.acc.process_index, self.acc.is_main_process, self.acc.device
        self.precision = Precision(t.mixed_precision, self.device, self.deepspeed)
        from accelerate.utils import set_seed

        set_seed(t.seed)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)

    def _find_resume(self):
        self.resume_from, self.meta = None, None
        if self.t.resume == "latest":
            try:
                self.resume_from = ckpt.resolve(self.out / "last")
            except ckpt.CheckpointError:
                self._say(f"resume=latest: no checkpoint in {self.out}, starting fresh")
        elif self.t.resume:
            self.resume_from = ckpt.resolve(self.t.resume)
        if self.resume_from:
            ckpt.check_files(self.resume_from)  # a truncated copy is named before anything of it is read
            self.meta = json.loads((self.resume_from / ckpt.META).read_text())
            if self.meta["world_size"] != self.world and self.deepspeed:
                raise ConfigError(f"{self.resume_from} was written by {self.meta['world_size']} ranks under DeepSpeed, "
                                  f"whose ZeRO partitions of the optimizer state are per rank; resume it on "
                                  f"{self.meta['world_size']} ranks (or start a new run from its weights with "
                                  f"train.init_from={self.resume_from})")

    def _build(self):
        """Data (the train stream's manifest; dev and test checked now, not after training), tokenizer, model,
        optimizer, all prepared by the accelerator."""
        r, t = self.recipe, self.t
        self.manifest = ensure_shards(r.data, r.data.train_split, self.main, self.acc.wait_for_everyone,
                                      progress=self.main)
        self.dev = load_split(data_root(r), r.data.dev_split, r.data.image_size, verify=r.data.verify)
        if t.score_test:  # a bad test split fails now, not after the whole training; unscored, it is never read
            check_split(r, r.data.test_split)
        init = ckpt.resolve(t.init_from) if t.init_from and not self.resume_from else None
        source = self.resume_from or init
        vocab = source / ckpt.VOCAB if source else None
        vocab = vocab if vocab and vocab.is_file() else None
        self.tokenizer = make_tokenizer(r, captions=None if vocab else split_captions(self.manifest), vocab_file=vocab)
        kind = self.manifest.get("kind", "features")
        self.img_dim = self.manifest["feature_shape"][-1] if kind == "features" else 0  # 0: raw images
        model = build_model(r, self.img_dim, self.tokenizer)
        if init is not None:  # a resumed run has these weights in its checkpoint already
            ckpt.load_weights_into(model, init)
        if self.deepspeed and t.mixed_precision != "no":
            # One dtype for every parameter before the engine sees them: transformers already loads the
            # text encoder in the DeepSpeed config's dtype, and ZeRO-3 partitions parameters as they are
            # (mixed dtypes fail in its "defragment"). ZeRO-1/2 would make the same cast themselves.
            model.to(DTYPES[t.mixed_precision])
        optimizer, self.optimizer_impl = make_optimizer(model.to(self.device), r.optim)
        if t.compile:
            model.compile()  # in place: the state dict keeps its names (no _orig_mod. prefix)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.aids = Aids(t, r.eval.best_metric, self.ds_config)  # EMA (from the initial weights), early stopping
        self.aids.setup(self.acc.unwrap_model(self.model))

    # ------------------------------------------------------------------ resume

    def resume(self):
        """The training state of the checkpoint found in setup (weights-only loads), ``best`` reconciled with it;
        then the MLflow run (the same one a resumed run keeps) and the start line."""
        if self.resume_from:
            ckpt.load_training_state(self.acc, self.resume_from / ckpt.STATE, self.precision.scaler)
            self.state = TrainState.from_dict(self.meta["train_state"], self.resume_from / ckpt.META)
            self.aids.resume(self.resume_from)
            self._new_segment()
            if self.main and self.resume_from == self.out / "last":
                self._say(ckpt.reconcile_best(self.out, self.meta))
                self._say(reconcile_best_ema(self.out, self.meta))
        self._start_tracking()

    def _new_segment(self):
        """Mid-epoch on another data-stream shape: ``itr.data.segments`` deals the rest of the epoch to these ranks."""
        self._say(begin_segment(self.state, stream_shape(self.meta, self.resume_from / ckpt.RECIPE), self.loader.shape()))

    def _start_tracking(self):
        r, s = self.recipe, self.state
        train_tracking.start(self)
        if not self.main:
            return
        info = train_tracking.run_info(self)
        self._say(f"{r.model.name} on {self.dataset}: world {self.world} x batch {self.rank_batch} x accum "
                  f"{self.t.grad_accum}, precision {self.t.mixed_precision}, optimizer {self.optimizer_impl}, "
                  f"device {self.device}, deepspeed {info['deepspeed']}"
                  + (f", resumed from {self.resume_from} at epoch {s.epoch} step {s.global_step}"
                     if self.resume_from else ""))

    # ------------------------------------------------------------------ train

    def train(self):
        """Every epoch from the resumed position; returns how it stopped (None, "max_steps" or "signal")."""
        t, s = self.t, self.state
        self.loss_mean = self.acc.unwrap_model(self.model).loss_reduction == "mean"
        if s.pending_eval:  # a signal arrived right after an epoch's last step
            self.end_of_epoch(s.epoch)
        self.model.train()
        self.last_log, self.last_log_step = time.perf_counter(), s.global_step
        self.throughput, self.started = [], time.perf_counter()
        self.epoch_steps = [self.loader.num_batches(e, s.segments if e == s.epoch else ()) // t.grad_accum
                            for e in range(t.epochs)]
        self.total_steps = sum(self.epoch_steps)
        for epoch in range(s.epoch, t.epochs):
            if self.aids.stop_early(s, self.device, self._say):
                break
            stopped = self.run_epoch(epoch)
            done = s.micro_in_epoch >= self.epoch_steps[epoch] * t.grad_accum
            if done:
                s.epoch, s.micro_in_epoch, s.segments = epoch + 1, 0, []
            if stopped == "signal":  # preemption: save now, evaluate after the restart
                s.pending_eval = done
                self.save_checkpoint()
                self._say(f"stopped by signal {self.stop.signal} at step {s.global_step}; resume with: "
                          f"itr train ... --out {self.out} train.resume=latest")
                self.tracker.finish("KILLED")
                return stopped
            self._report_skipped(epoch)
            self.end_of_epoch(epoch + 1)
            if stopped:
                return stopped
        return None

    def run_epoch(self, epoch):
        """The optimizer steps of ``epoch`` left in the data stream; stops early at a signal or train.max_steps."""
        t, s = self.t, self.state
        steps = self.epoch_steps[epoch]
        first = s.micro_in_epoch // t.grad_accum
        batches = self.loader.epoch(epoch, skip=s.micro_in_epoch, segments=s.segments)
        bar = progress.bar(total=steps, initial=first, desc=f"epoch {epoch + 1}/{t.epochs}", enabled=self.main,
                           unit="step")
        stopped = None
        try:
            for _ in range(first, steps):
                self.optimizer_step(epoch, [move_to(next(batches), self.device) for _ in range(t.grad_accum)], bar)
                if t.checkpoint_every and s.global_step % t.checkpoint_every == 0:
                    self.save_checkpoint()
                if self.stop.requested(self.device):
                    stopped = "signal"
                    break
                if t.max_steps and s.global_step >= t.max_steps:
                    stopped = "max_steps"
                    break
        finally:
            bar.close()
            batches.close()
        return stopped

    def optimizer_step(self, epoch, micro_batches, bar):
        """One step (``train_step``, unscale, clip, step), then the loss every train.log_every steps."""
        t, s = self.t, self.state
        lr = set_lr(self.optimizer, self.recipe.optim, epoch, s.global_step, self.total_steps)
        loss_sum = train_step(self.model, micro_batches, epoch, self.acc, self.precision, self.world).float()
        self.precision.unscale_(self.optimizer)
        grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
        skipped = self.precision.step(self.optimizer)  # DeepSpeed stepped inside backward; this is then a no-op
        self.aids.after_step(self.acc.unwrap_model(self.model))  # the InfoNCE temperature's clamp, the EMA
        self.optimizer.zero_grad(set_to_none=True)
        if skipped or self.acc.optimizer_step_was_skipped:
            s.skipped_steps += 1  # fp16 overflow: the update was not applied
        s.global_step += 1
        s.micro_in_epoch += t.grad_accum
        bar.update(1)
        rundir.fault(f"step {s.global_step}")
        if STEP_DELAY and not self.resume_from:
            time.sleep(STEP_DELAY)
        if s.global_step % t.log_every == 0:
            self._log_step(epoch, loss_sum, lr, grad_norm, bar)

    def _log_step(self, epoch, loss_sum, lr, grad_norm, bar):
        t, s = self.t, self.state
        total = all_reduce_sum(loss_sum).item()
        per_pair = total if self.loss_mean else total / t.batch_size
        now = time.perf_counter()
        sps = (s.global_step - self.last_log_step) * t.batch_size / max(now - self.last_log, 1e-9)
        self.last_log, self.last_log_step = now, s.global_step
        bar.set_postfix(loss=f"{per_pair:.4f}", lr=f"{lr:.2g}", sps=f"{sps:.0f}")
        s.history["loss"].append([s.global_step, per_pair])
        self.throughput.append(sps)
        if self.main:
            train_tracking.log_step(self, epoch, per_pair, lr, grad_norm, sps, memory_metrics(self.device))
        if not math.isfinite(total):
            raise FloatingPointError(f"loss is {total} at step {s.global_step}; "
                                     f"lower optim.lr or use train.mixed_precision=bf16/no")

    def end_of_epoch(self, label):
        """Dev evaluation (and the EMA's), then DIR/last (recording a new best), then DIR/best (and DIR/best_ema)
        promoted from it (itr.rundir)."""
        r, s = self.recipe, self.state
        dev = lambda m: evaluate_model(m, self.dev, self.tokenizer, r.eval, self.device, self.rank,  # noqa: E731
                                       self.world)[0]
        metrics = dev(self.acc.unwrap_model(self.model))
        ema, ema_improved = self.aids.evaluate(self.acc.unwrap_model(self.model), dev, s, label)
        improved = False
        if self.main:
            score = metrics[r.eval.best_metric]
            improved = s.best is None or score > s.best
            if improved:
                s.best, s.best_epoch, s.best_dev, s.best_step = score, label, metrics, s.global_step
            train_tracking.log_dev(self, label, metrics)
            s.history["dev"].append([label, metrics])
            tqdm.write(format_table(metrics, f"dev after epoch {label} (best {r.eval.best_metric} "
                                             f"{s.best:.1f} at epoch {s.best_epoch})"))
            self.aids.report(ema, self.tracker, s, label)
        s.pending_eval = False
        self.save_checkpoint()
        if self.main and improved:
            ckpt.promote(self.out / "last", self.out / "best", self.checkpoint_meta())
        if self.main and ema_improved:
            promote_ema(self.out, self.checkpoint_meta())
        self.acc.wait_for_everyone()

    def _report_skipped(self, epoch):
        """data.on_error=skip: the samples every rank passed over this epoch, to the console and MLflow."""
        total, first = self.loader.skipped_total(self.device)
        if total:
            self._say(f"data.on_error=skip: {total} unreadable sample(s) skipped in epoch {epoch + 1}; first: {first}")
            self.tracker.log_metrics({"data/skipped": total}, step=self.state.global_step)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_meta(self):
        return {"train_state": self.state.to_dict(), "world_size": self.world, "img_dim": self.img_dim,
                "rank_batch": self.rank_batch, "grad_accum": self.t.grad_accum, "stream": self.loader.shape().as_dict(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def save_checkpoint(self):
        """DIR/last: weights, training state, tokenizer, recipe (collective: every rank calls it)."""
        ckpt.save(self.out / "last", self.acc, self.model, self.rd, self.tokenizer, self.checkpoint_meta(),
                  deepspeed=self.deepspeed, scaler=self.precision.scaler, extra=self.aids.files())

    # ------------------------------------------------------------------ finish

    def finish(self):
        """The best checkpoint on the test split, results.json, plots and MLflow artifacts; returns the results."""
        r, s = self.recipe, self.state
        results = {"best_epoch": s.best_epoch, "dev": s.best_dev, "run_id": self.tracker.run_id,
                   "experiment_id": self.tracker.experiment_id, "global_step": s.global_step, "world_size": self.world,
                   "optimizer_impl": self.optimizer_impl}
        test = final_test(r, self.out, self.device, self.rank, self.world) if self.t.score_test else None
        if self.t.score_test:
            results.update(self.aids.test(r, self.out, self.device, self.rank, self.world, self.tracker, s.global_step))
        if self.main:
            results["test_scored"] = test is not None
            train_tracking.log_test(self, test)
            if not self.t.score_test:
                run = f" --log-to-run {self.tracker.run_id}" if self.tracker.run_id else ""
                self._say(f"train.score_test=false: {r.data.test_split!r} not scored; once this recipe is chosen: "
                          f"itr eval {self.out / 'best'} --data {data_root(r)} --split {r.data.test_split}{run}")
            if test is not None:
                results["test"] = test
                print(format_table(test, f"test ({r.data.test_split}) with the best dev checkpoint, "
                                         f"protocol {r.eval.protocol}"), flush=True)
            rundir.write_text_atomic(self.out / "results.json", json.dumps(results, indent=1))
            train_tracking.artifacts(self, test)
        self.tracker.finish()
        self.acc.wait_for_everyone()
        return results

    def cleanup(self):
        train_tracking.stop_node_monitor(self)
        self.stop.close()
        if self.lock is not None:
            self.lock.release()

    def _say(self, line):
        if line and getattr(self, "main", int(os.environ.get("RANK", "0")) == 0):
            print(f"[itr] {line}", flush=True)
