"""A hand-written training loop, the same on one process and on N ranks.

    python train.py --epochs 50                              # one process
    torchrun --standalone --nproc_per_node=2 train.py ...    # two ranks, gloo on CPU / nccl on GPU

Read `train()` top to bottom: data, model, optimizer, loss, sampler, then the epoch loop. One step is
`forward_backward()` (the micro-batches: forward, loss, backward) followed, in the loop, by the grad norm,
the optimizer step and zero-grad; after each epoch, `Validation` (eval mode, no gradients, its own metric) and
the epoch's one all-reduce. Everything that is not the loop (flags, process group, checkpoints, logging, the
deliberate mistakes of --break) lives in spine/, each part behind a small named component.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: threads that wait sleep instead of spinning, so a core another process holds cannot
# stall every step (spine/distributed.py, default_threads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses
import json
import math
import operator
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import reduce

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler

from data import SplitDataset, build_dataset, fingerprint
from models import build_model, multiply_adds
from spine import breaks, faults, summary
from spine.checkpointer import Checkpointer
from spine.compiler import compiled, failure_line
from spine.config import Config, parse_config, to_toml
from spine.distributed import (
    NO_CONTEXT,
    DistContext,
    all_reduce_sum,
    broadcast_buffers,
    default_threads,
    distributed_session,
    epoch_indices,
    gather_objects,
    grad_sync,
    launch_env,
    per_rank_values,
    print0,
)
from spine.errors import TrainingError, UsageError
from spine.guard import NonFiniteGuard
from spine.instruments.loop import Instruments
from spine.instruments.lr_find import LR_FIND_RULE, LRRangeTest, plot_lr_range
from spine.logger import RunLogger, now
from spine.metrics import EpochMeter, GradNorm
from spine.optim import build_optimizer, build_scheduler, grad_accumulators
from spine.precision import Precision
from spine.state import TrainState


def load_data(cfg: Config, ctx: DistContext) -> SplitDataset:
    """Generated from --data-seed on every rank, never from the rank, so the shards line up; proven equal."""
    data = build_dataset(cfg.dataset, cfg.n_samples, cfg.val_fraction, cfg.noise, cfg.dim, cfg.classes,
                         cfg.data_seed, cfg.order, ctx.world_size, ctx.local_world_size).to(ctx.device)
    if cfg.limit_samples:
        data = data.limit_train(cfg.limit_samples)
    fingerprints = per_rank_values(int(data.fingerprint[:13], 16), ctx)
    if len(set(fingerprints)) != 1:
        raise TrainingError(f"ranks built different datasets (fingerprints {fingerprints}); "
                            "check --data-seed and that every rank runs the same code")
    return data


def train_sampler(n: int, ctx: DistContext, seed: int) -> DistributedSampler:
    """Each rank gets a disjoint 1/world of a permutation seeded by seed + epoch (hence `set_epoch`)."""
    return DistributedSampler(range(n), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)


class Validation:
    """Exact loss and accuracy on (x, y), shared out over the ranks: each rank sums over its shard, the sums are
    all-reduced (in the epoch's one all-reduce), then divided once, so any world size gives the single-process
    answer. DistributedSampler pads its index list (repeating the first entries) until it divides by the world
    size; the shard leaves those repeats out, or they would count twice."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, ctx: DistContext, batch_size: int, bug: str = "",
                 amp: Precision | None = None) -> None:
        self.x, self.y, self.batch_size, self.bug = x, y, batch_size, bug
        self.amp = amp or Precision("fp32", x.device)  # the training precision: what is measured is what was trained
        padded = DistributedSampler(range(len(x)), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=False)
        # This rank's k-th index sits at position rank + k*world of the padded list; positions >= len(x) are padding.
        position = ctx.rank + ctx.world_size * torch.arange(len(padded))
        self.shard = torch.tensor(list(padded), dtype=torch.long)[position < len(x)].to(x.device)

    @torch.no_grad()  # no autograd graph: validation must not build one, nor touch .grad
    def sums(self, model: nn.Module) -> torch.Tensor:
        """This rank's (loss sum, correct, count) over its shard, in float64 (counts are exact in it)."""
        if self.bug != "no-eval-mode":
            model.eval()  # dropout off, BatchNorm uses (and no longer updates) its running statistics
        loss_sums, corrects = [], []
        for start in range(0, len(self.shard), self.batch_size):
            idx = self.shard[start:start + self.batch_size]
            y = self.y[idx]
            with self.amp.autocast():
                logits = model(self.x[idx])
            loss_sums.append(F.cross_entropy(logits, y, reduction="none").double().sum())
            corrects.append((logits.argmax(1) == y).sum())
        if not loss_sums:  # more ranks than validation samples: this rank's shard is empty
            return torch.zeros(3, dtype=torch.float64, device=self.x.device)
        # Added in batch order, as a running total would be; `totals[i] += v` would cost three tensor ops each.
        count = torch.tensor(float(len(self.shard)), dtype=torch.float64, device=self.x.device)
        return torch.stack([reduce(operator.add, loss_sums), reduce(operator.add, corrects).double(), count])

    def metrics(self, local: torch.Tensor, reduced: list[float]) -> tuple[float, float]:
        """(loss, accuracy) from the sums reduced over every rank (`local` is this rank's own)."""
        loss_sum, correct, count = reduced
        return loss_sum / count, correct / count


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: DistContext,
             batch_size: int, amp: Precision | None = None) -> tuple[float, float]:
    """Exact (loss, accuracy) of `model` on (x, y) right now: a collective, every rank calls it."""
    validation = Validation(x, y, ctx, batch_size, amp=amp)
    local = validation.sums(model)
    return validation.metrics(local, all_reduce_sum(local.clone()).tolist())


def forward_backward(ddp_model: nn.Module, loss_fn: nn.Module, data: SplitDataset, idx: torch.Tensor,
                     micro_batch: int, amp: Precision | None = None,
                     measure: Callable[[int, int], AbstractContextManager] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's gradients into .grad, from this rank's samples `idx`: the step's mean loss, and its logits with
    their labels, detached (the meter takes the predicted classes of many steps in one argmax, once per epoch).

    Gradient accumulation: the step's batch is cut into micro-batches of `micro_batch` whose gradients add up in
    .grad; only the last one's backward all-reduces. With one micro-batch it is one plain, synchronised batch.
    `amp`: forward and loss under autocast (bf16/fp16; nothing at fp32), backward of the scaled loss under fp16.
    `measure(micro, step)` wraps each backward (an instrument's context: the noise scale's micro-batch gradient);
    None when nothing measures the step, which with one micro-batch, fp32 and a mean loss allows the plain path.
    """
    amp = amp or Precision("fp32", idx.device)  # fp32: plain forward, backward and (in the loop) step
    step_size = idx.shape[0]
    if step_size <= micro_batch and amp.dtype is None and measure is None and loss_fn.reduction == "mean":
        # The plain step: one batch, fp32, a mean loss, nothing measuring it. The general path computes the same floats;
        # its contexts and bookkeeping cost about 1% of a small model's step, so the default run does without.
        x, y = data.train_x[idx], data.train_y[idx]
        logits = ddp_model(x)  # forward
        loss = loss_fn(logits, y)  # mean over this rank's batch; DDP's averaging makes it the global mean
        loss.backward()  # gradients into .grad; under DDP, all-reduced as they appear
        return loss.detach(), logits.detach(), y
    measure = measure or (lambda *_: NO_CONTEXT)
    micro_batches = idx.split(micro_batch) if step_size > micro_batch else (idx,)
    step_loss, step_logits = None, []
    for i, micro_idx in enumerate(micro_batches):
        x, y = data.train_x[micro_idx], data.train_y[micro_idx]
        micro_size = x.shape[0]
        with grad_sync(ddp_model, sync=i == len(micro_batches) - 1):  # no_sync() unless the last: forward AND backward
            with amp.autocast():  # --precision bf16/fp16; a no-op at fp32
                logits = ddp_model(x)  # forward
                loss = loss_fn(logits, y)  # mean over this rank's batch; DDP's averaging makes it the global mean
            if len(micro_batches) > 1:  # weighted by its share of the step's samples: .grad sums to the step's mean
                loss = loss * (micro_size / step_size)
            with measure(micro_size, step_size):
                amp.backward(loss)  # loss.backward() (scaled under fp16); under DDP, all-reduced as gradients appear
        step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
        step_logits.append(logits.detach())
    amp.unscale()  # fp16: divide .grad by the loss scale, so the grad norm and clipping see the true gradients
    if loss_fn.reduction == "sum":  # --break sum-loss: the loss stepped on is a sum, the one logged stays a mean
        step_loss = step_loss / step_size
    if len(micro_batches) == 1:
        return step_loss, step_logits[0], y
    return step_loss, torch.cat(step_logits), data.train_y[idx]


def train(cfg: Config, ctx: DistContext) -> dict:
    data = load_data(cfg, ctx)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP would broadcast rank 0's anyway)
    model = build_model(cfg.model, data.input_shape, data.num_classes, cfg.hidden, cfg.activation, cfg.dropout,
                        cfg.batchnorm).to(ctx.device)
    if not cfg.threads:  # the default: one thread for a small step, all of the rank's cores for a large one
        threads = default_threads(ctx.local_world_size, multiply_adds(model, data.train_x[:1]) * cfg.batch_size)
        torch.set_num_threads(threads)
        ctx = dataclasses.replace(ctx, threads=threads)
    if cfg.sync_batchnorm:  # GPU only (config refuses it on CPU): BatchNorm over the global batch, not each rank's
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp_model = DDP(model) if ctx.world_size > 1 else model  # DDP averages gradients over ranks in backward()
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    amp = Precision(cfg.precision, ctx.device, optimizer)  # autocast, fp16's scaler; refuses what cannot run here
    loss_fn = nn.CrossEntropyLoss()  # mean, not sum: a summed loss makes the step grow with the batch size
    sampler = train_sampler(len(data.train_x), ctx, cfg.seed)
    validation = Validation(data.val_x, data.val_y, ctx, cfg.eval_batch_size, bug=cfg.break_, amp=amp)
    # --break NAME: four mistakes are an `if` beside the line they break, below; the others patch these parts.
    model, ddp_model, optimizer, loss_fn, sampler, validation = breaks.apply(
        cfg.break_, breaks.Parts(model, ddp_model, optimizer, loss_fn, sampler, validation), ctx)
    ddp_model = compiled(ddp_model) if cfg.compile else ddp_model  # --compile: the training forward only
    step_batch = cfg.batch_size * cfg.grad_accum_steps  # samples per rank per optimizer step
    steps_per_epoch = math.ceil(len(sampler) / step_batch)
    scheduler = build_scheduler(optimizer, cfg.epochs * steps_per_epoch, cfg.schedule, cfg.warmup_steps)
    params = list(model.parameters())
    _held_for_the_run = grad_accumulators(params)  # autograd would rebuild them every step (spine/optim.py)
    total_grad_norm = GradNorm(params)  # torch.nn.utils.get_total_norm's arithmetic, with less Python per call

    state, meter = TrainState(), EpochMeter()
    checkpointer = Checkpointer(cfg, ctx, data.fingerprint, model, optimizer, scheduler, state, meter, amp.scaler)
    resumed = checkpointer.restore()  # or start fresh; decided by rank 0 before anything is written
    if not resumed:
        state.initial_loss, _ = evaluate(model, data.train_x, data.train_y, ctx, cfg.eval_batch_size, amp)
        torch.manual_seed(cfg.seed * 1000 + 1 + ctx.rank)  # dropout: each rank's own stream for its own samples
    faults.install(model, optimizer, state.global_step)  # SPINE_FAULT (tests only); a no-op when unset
    logger = RunLogger(cfg.run_dir(), ctx.is_main, cfg.tensorboard, state.global_step + 1 if resumed else None,
                       state.epoch, cfg.epochs, cfg.print_every)
    logger.config(to_toml(cfg, f"world size {ctx.world_size}, {ctx.threads} thread(s) per rank"))
    logger.header(summary.header(cfg, ctx, data, model, steps_per_epoch, state))
    checkpointer.before_save = logger.flush  # the logs up to a checkpoint reach the disk before it
    guard = NonFiniteGuard(ctx, params, meter)
    instruments = Instruments(cfg, ctx, model, optimizer, data, logger, steps_per_epoch)  # spine/instruments
    checkpointer.attach(instruments)  # their state (the noise scale's averages) is saved and resumed with the run
    t_start, samples_trained, train_seconds, stopped = now(), 0, 0.0, None

    while state.epoch < cfg.epochs and not stopped:
        # The shuffle is a permutation seeded by seed + epoch: without set_epoch every epoch repeats epoch 0's order.
        if cfg.break_ != "no-set-epoch":
            sampler.set_epoch(state.epoch)
        instruments.epoch_start(sampler, state.epoch)  # a live guard: the sampler's epoch must be the loop's
        order = epoch_indices(sampler, ctx.device)  # this rank's shard of the epoch's permutation
        if cfg.break_ != "no-train-mode":
            model.train()  # dropout on, BatchNorm uses (and updates) batch statistics; validation switched it off
        trained_in_train_mode, t_epoch = model.training, now()
        for position in range(state.step_in_epoch, steps_per_epoch):
            idx = order[position * step_batch:(position + 1) * step_batch]  # this rank's samples for this step
            step = state.global_step + 1
            logged = step % cfg.log_every == 0  # this step's scalars go to TensorBoard
            instruments.step_start(step)  # guards: train mode, .grad cleared; sharpness and layer hooks when due
            loss, logits, labels = forward_backward(ddp_model, loss_fn, data, idx, cfg.batch_size, amp,
                                                   instruments.backward_context)
            # The total norm is several kernels: measured on logged steps, and on every step to clip.
            need_norm = logged or cfg.grad_clip or instruments.needs_grad_norm
            grad_norm = total_grad_norm() if need_norm else None
            instruments.before_update(step, grad_norm, len(idx))
            if cfg.grad_clip:
                torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, grad_norm)
            skipped = amp.step()  # optimizer.step(), identical on every rank (fp16: skipped if a grad is inf/NaN)
            # .grad accumulates by default: without this, every step would also re-apply all earlier gradients.
            if cfg.break_ != "no-zero-grad":
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()  # the lr for the next step
            instruments.after_update(step)
            meter.record(loss, logits, labels, grad_norm, skipped)  # stays on the device: no host sync here
            state.step_in_epoch, state.global_step = position + 1, step
            if logged:  # the only host syncs inside an epoch
                if stopped := guard.check_steps(state.global_step):
                    break
                logger.step(meter, state.global_step, scheduler.get_last_lr()[0], state.epoch, state.elapsed(),
                            console=steps_per_epoch > cfg.log_every)
            if checkpointer.due_at_step() and (stopped := checkpointer.save(guard)):  # refuses non-finite weights
                break
        if stopped:
            break
        epoch_seconds = now() - t_epoch
        broadcast_buffers(model)  # each rank's last step updated BatchNorm's running stats from its own shard
        val_sums = validation.sums(model)
        modes = (trained_in_train_mode, instruments.validated(model, state.epoch + 1))  # a live guard: eval mode?
        order_fingerprint = fingerprint(order)  # the epoch's one all-reduce carries it: shards must be disjoint
        # The epoch's one all-reduce: train and val sums, unchecked steps' non-finite flags, rank 0's checkpoint clock
        totals = meter.end_of_epoch(ctx, guard.checked, order_fingerprint, checkpointer.due_by_clock(), extra=val_sums)
        if stopped := guard.end_of_epoch(totals.bad, state.global_step):
            break
        val_loss, val_acc = validation.metrics(val_sums, totals.extra)
        train_seconds, samples_trained = train_seconds + epoch_seconds, samples_trained + len(sampler) * ctx.world_size
        row = summary.epoch_row(state, totals, (val_loss, val_acc), scheduler.get_last_lr()[0], epoch_seconds,
                                len(sampler) * ctx.world_size, order_fingerprint, modes)
        state.end_epoch(row, cfg.target_loss)
        meter.clear()
        stopped = guard.check_validation(val_loss, state.epoch)  # reduced over ranks: every rank stops together
        due = checkpointer.due_at_epoch_end(totals.rank0_flag)
        is_best = due and state.improves_best(val_loss, val_acc)  # best.pt: the best of the checkpoints written
        logger.epoch(row, state.elapsed())
        if due and not stopped:
            stopped = checkpointer.save(guard, best=is_best)

    loop_seconds = now() - t_start  # the epochs and all they do: steps, validation, logging, checkpoints
    if stopped:
        print0(f"stopped: {stopped}; no checkpoint written after the last finite one")
        logger.partial_epoch(meter, state)  # the steps that led up to it: the evidence of how the run blew up
    # Bitwise fingerprints of every rank's weights and buffers: DDP keeps replicas identical, so all are equal.
    replica_checksums = gather_objects(fingerprint(*model.state_dict().values()), ctx)
    broadcast_buffers(model)  # the reference below must match the validation above: rank 0's final weights
    exact_val = evaluate(model, data.val_x, data.val_y, ctx, cfg.eval_batch_size, amp) if state.epoch else None
    result = summary.build(cfg, ctx, state, data, loop_seconds=loop_seconds, train_seconds=train_seconds,
                           samples_trained=samples_trained, stopped=stopped, exact_val=exact_val,
                           replica_checksums=replica_checksums, instruments=instruments.summary())
    instruments.close()
    summary.finish(result, cfg, ctx, logger)
    return result


def find_lr(cfg: Config, ctx: DistContext) -> dict:
    """--lr-find: Smith's LR range test on a fresh model, with the run's data, model, optimizer and batch. The lr
    grows geometrically each step until the loss blows up; nothing is checkpointed, so an existing run of the same
    name keeps its checkpoints. Writes <run>/lr_find.png and lr_find.json; prints the suggestion and its rule."""
    data = load_data(cfg, ctx)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.in_dim, data.num_classes, cfg.hidden, cfg.activation, cfg.dropout,
                        cfg.batchnorm).to(ctx.device)
    ddp_model = DDP(model) if ctx.world_size > 1 else model
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    sampler, loss_fn, step_batch = train_sampler(len(data.train_x), ctx, cfg.seed), nn.CrossEntropyLoss(), \
        cfg.batch_size * cfg.grad_accum_steps
    finder, epoch = LRRangeTest(cfg.lr_find_min, cfg.lr_find_max, cfg.lr_find_steps), 0
    model.train()
    while not finder.done:
        sampler.set_epoch(epoch)
        order, epoch = epoch_indices(sampler, ctx.device), epoch + 1
        for start in range(0, len(order), step_batch):
            lr = finder.next_lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, _, _ = forward_backward(ddp_model, loss_fn, data, order[start:start + step_batch], cfg.batch_size)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # The mean over ranks, so every rank takes the same decision and stops at the same step.
            if finder.record(lr, all_reduce_sum(loss.detach().double().reshape(1)).item() / ctx.world_size):
                break
    result = dict(finder.summary(), rule=LR_FIND_RULE, lrs=finder.lrs, losses=finder.losses, diverged=False)
    if ctx.is_main:
        cfg.run_dir().mkdir(parents=True, exist_ok=True)
        plot_lr_range(finder, cfg.run_dir() / "lr_find.png", f"LR range test: {cfg.optimizer}, batch {step_batch}")
        (cfg.run_dir() / "lr_find.json").write_text(json.dumps(result, indent=1) + "\n")
        suggestion = "none (the loss never fell)" if result["suggestion"] is None else f"{result['suggestion']:.3g}"
        print(f"lr range test: {len(finder.losses)} steps, {finder.stop_reason}; plot {cfg.run_dir() / 'lr_find.png'}")
        print(f"suggested lr: {suggestion} ({LR_FIND_RULE})", flush=True)
    return result


def run(argv: list[str] | None, ctx: DistContext | None = None) -> int:
    """One run with its exit code: 0 done, 1 cannot go on, 2 bad input (one line, from rank 0), 3 diverged.
    In a given process group `ctx` (several runs in one torchrun job), or in a session of its own."""
    rank = launch_env()[0]
    try:
        cfg = parse_config(argv, world_size=ctx.world_size if ctx else None)
        job = find_lr if cfg.lr_find else train
        if ctx is not None:
            return 3 if job(cfg, ctx)["diverged"] else 0
        with distributed_session(cfg.device, cfg.threads, cfg.pg_timeout) as session:
            return 3 if job(cfg, session)["diverged"] else 0
    except UsageError as e:
        if rank == 0:  # every rank validates the same flags; one message is enough
            print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingError as e:
        print(f"train.py: error on rank {rank}: {e}", file=sys.stderr, flush=True)
        return 1
    except Exception as e:  # --compile: a failure inside the first step is one line, not pages of traceback
        if (line := failure_line(e)) is None:
            raise
        print(f"train.py: error on rank {rank}: {line}", file=sys.stderr, flush=True)
        return 1


@record  # a rank's traceback goes into torchrun's error summary
def main(argv: list[str] | None = None) -> int:
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
