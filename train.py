"""A hand-written training loop, the same on one process and on N ranks.

    python train.py --epochs 50                              # one process
    torchrun --standalone --nproc_per_node=2 train.py ...    # two ranks, gloo on CPU / nccl on GPU

Read `train()` top to bottom: data, model, optimizer, sampler, then the loop
(forward, loss, backward, step, zero-grad), then `evaluate()`. Everything that
is not the loop (flags, process group, checkpoints, logging) lives in spine/.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler

from data import build_dataset, fingerprint
from models import build_model
from spine import checkpoint as ckpt
from spine import faults
from spine.config import Config, parse_config
from spine.distributed import (
    DistContext,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    distributed_session,
    gather_objects,
    grad_sync,
    launch_env,
    per_rank_values,
)
from spine.errors import TrainingError, UsageError
from spine.experiment import read_run
from spine.logger import RunLogger, fmt_seconds, now
from spine.metrics import EpochMeter
from spine.optim import build_optimizer, build_scheduler
from spine.symptoms import detect as detect_symptoms


@torch.no_grad()  # no autograd graph: validation must not build one, nor touch .grad
def validation_sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: DistContext,
                    batch_size: int, bug: str = "") -> torch.Tensor:
    """This rank's (loss sum, correct, count) over its share of (x, y): sum these over ranks, then divide.

    DistributedSampler pads the index list (repeating its first entries) until
    it divides by the world size; counting those repeats would bias the metric.
    Padded positions are dropped here, so the reduced sums divided once equal a
    single-process evaluation.
    """
    if bug != "no-eval-mode":
        model.eval()  # dropout off, BatchNorm uses (and no longer updates) its running statistics
    sampler = DistributedSampler(range(len(x)), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=False)
    shard = torch.tensor(list(sampler), dtype=torch.long, device=x.device)
    # This rank's k-th index sits at position rank + k*world of the padded list; positions >= len(x) are padding.
    position = ctx.rank + ctx.world_size * torch.arange(len(shard), device=x.device)
    if bug != "padded-val":
        shard = shard[position < len(x)]
    totals = torch.zeros(3, dtype=torch.float64, device=x.device)  # loss sum, correct, count
    for start in range(0, len(shard), batch_size):
        idx = shard[start:start + batch_size]
        logits = model(x[idx])
        totals[0] += F.cross_entropy(logits, y[idx], reduction="none").double().sum()
        totals[1] += (logits.argmax(1) == y[idx]).sum()
        totals[2] += len(idx)
    return totals


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: DistContext,
             batch_size: int, bug: str = "") -> tuple[float, float]:
    """Exact loss and accuracy of `model` on (x, y), shared out over the ranks (the epoch loop instead sends
    validation_sums through its one end-of-epoch all-reduce)."""
    totals = validation_sums(model, x, y, ctx, batch_size, bug)
    if bug != "rank0-val":  # without the reduction each rank reports its own shard, and rank 0's gets logged
        all_reduce_sum(totals)
    loss_sum, correct, count = totals.tolist()
    return loss_sum / count, correct / count


def train(cfg: Config, ctx: DistContext) -> dict:
    say = print if ctx.is_main else (lambda *a, **k: None)
    bug = cfg.mistake  # "" unless `--break NAME` injects one deliberate mistake (see `make break`)
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    ckpt_dir = Path(cfg.checkpoints_dir) / cfg.run_name

    # Data: generated from --data-seed on every rank, never from the rank, so the shards line up.
    data = build_dataset(cfg.dataset, cfg.n_samples, cfg.val_fraction, cfg.noise, cfg.dim, cfg.classes,
                         cfg.data_seed, cfg.order).to(ctx.device)
    if cfg.limit_samples:
        data = data.limit_train(cfg.limit_samples)
    fingerprints = per_rank_values(int(data.fingerprint[:13], 16), ctx)
    if len(set(fingerprints)) != 1:
        raise TrainingError(f"ranks built different datasets (fingerprints {fingerprints}); "
                            "check --data-seed and that every rank runs the same code")

    # Model: the same seed gives every rank the same initial weights (DDP would broadcast rank 0's anyway).
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.in_dim, data.num_classes, cfg.hidden, cfg.activation, cfg.dropout,
                        cfg.batchnorm).to(ctx.device)
    # DDP averages gradients across ranks during backward(); at world 1 there is nothing to average.
    ddp_model = DDP(model) if ctx.world_size > 1 else model
    params = list(model.parameters())
    lr = cfg.lr * 1000 if bug == "huge-lr" else cfg.lr
    optimizer = build_optimizer(cfg.optimizer, params, lr, cfg.momentum, cfg.weight_decay)
    # Mean, not sum: a summed loss makes the gradient, and so the step, grow with the batch size.
    loss_fn = nn.CrossEntropyLoss(reduction="sum" if bug == "sum-loss" else "mean")

    # Each rank gets a disjoint 1/world of a permutation that depends on seed + epoch.
    sampler = DistributedSampler(range(len(data.train_x)), num_replicas=ctx.world_size, rank=ctx.rank,
                                 shuffle=bug != "no-shuffle", seed=cfg.seed)
    if bug == "no-distributed-sampler":  # one replica's view: every rank walks the whole dataset
        sampler = DistributedSampler(range(len(data.train_x)), num_replicas=1, rank=0, shuffle=True, seed=cfg.seed)
    # One optimizer step takes --grad-accum-steps micro-batches of --batch-size on each rank.
    accumulate = cfg.grad_accum_steps > 1
    step_batch = cfg.batch_size * cfg.grad_accum_steps
    steps_per_epoch = math.ceil(len(sampler) / step_batch)
    scheduler = build_scheduler(optimizer, cfg.epochs * steps_per_epoch, cfg.schedule, cfg.warmup_steps)

    # Resume, or start fresh. Decided on every rank from the same files, before anything is written.
    epoch, step_in_epoch, global_step, elapsed_before = 0, 0, 0, 0.0
    meter = EpochMeter()
    tracker = {"best_val_loss": math.inf, "best_val_acc": None, "best_epoch": None, "best_step": None,
               "epochs_to_100_train_acc": None, "steps_to_100_train_acc": None,
               "epochs_to_target_loss": None, "steps_to_target_loss": None, "initial_loss": None,
               "first_step_loss": None}
    resumed = _load_resume(cfg, ctx, ckpt_dir, run_dir, data.fingerprint, say)
    barrier()  # every rank has looked at the folders before rank 0 writes to them
    if resumed:
        state, path = resumed
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        progress = state["progress"]
        epoch, step_in_epoch = progress["epoch"], progress["step_in_epoch"]
        global_step, elapsed_before = progress["global_step"], progress["elapsed"]
        saved_meter = state["meter"]  # one per rank since a mid-epoch resume at world 2 mixed rank 0's into rank 1's
        meter.load_state_dict(saved_meter[ctx.rank] if isinstance(saved_meter, list) else saved_meter, ctx.device)
        tracker.update(state["tracker"])
        if state["world_size"] == ctx.world_size:
            ckpt.set_rng_state(state["rng"][ctx.rank])  # dropout masks continue where they stopped
        else:
            torch.manual_seed(cfg.seed * 1000 + 1 + ctx.rank)
        say(f"resumed from {path} at epoch {epoch}, step {global_step}")
    else:
        if cfg.overwrite and ctx.is_main:
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        tracker["initial_loss"], _ = evaluate(model, data.train_x, data.train_y, ctx, cfg.eval_batch_size)
        # Dropout masks: a different stream per rank, since each rank sees different samples.
        torch.manual_seed(cfg.seed * 1000 + 1 + ctx.rank)
    faults.install(model, optimizer, global_step)  # SPINE_FAULT=kill|raise|hang|nan (tests only); no-op when unset

    logger = RunLogger(run_dir, ctx.is_main, cfg.tensorboard, purge_step=global_step + 1 if resumed else None,
                       keep_epochs=epoch)
    logger.header([
        ("run", f"{cfg.run_name}  (logs {run_dir}, checkpoints {ckpt_dir})"),
        ("world", f"{ctx.world_size} rank(s), backend {ctx.backend}, device {ctx.device}, "
                  f"{ctx.threads} thread(s) per rank"),
        ("batch", f"{cfg.batch_size} per rank" + (f" x {cfg.grad_accum_steps} accumulated" if accumulate else "")
                  + f", {step_batch * ctx.world_size} global, {steps_per_epoch} steps per epoch"),
        ("data", f"{cfg.dataset}: {len(data.train_x)} train / {len(data.val_x)} val, {data.in_dim}-d, "
                 f"{data.num_classes} classes, fingerprint {data.fingerprint}"),
        ("model", f"{cfg.model} {list(cfg.hidden)}, {sum(p.numel() for p in params):,} parameters"),
        ("optimizer", f"{cfg.optimizer} lr {cfg.lr:g}, schedule {cfg.schedule}, warmup {cfg.warmup_steps}, "
                      f"grad clip {cfg.grad_clip or 'off'}"),
        ("initial loss", f"{tracker['initial_loss']:.4f}  "
                         f"(ln K = {math.log(data.num_classes):.4f} for K = {data.num_classes})"),
    ])

    def save(epoch: int, position: int, best: bool = False) -> None:
        """Rank 0 writes; every rank's RNG state goes in, so dropout resumes exactly where it stopped."""
        nonlocal last_save
        logger.flush()  # the logs up to this checkpoint reach the disk before it: a resume from it leaves no gap
        rng = gather_objects(ckpt.rng_state(), ctx)
        meters = gather_objects(meter.state_dict(), ctx)  # the partial epoch of every rank: its metrics reduce over all
        failure = None
        if ctx.is_main:
            state = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "progress": {"epoch": epoch, "step_in_epoch": position, "global_step": global_step,
                             "elapsed": elapsed_before + now() - t_start},
                "meter": meters, "tracker": tracker, "rng": rng, "config": cfg.to_dict(),
                "world_size": ctx.world_size, "dataset_fingerprint": data.fingerprint,
                "torch_version": str(torch.__version__),
            }
            try:
                ckpt.save_checkpoint(state, ckpt_dir, global_step, cfg.keep_checkpoints, best)
            except TrainingError as e:  # disk full, folder gone: every rank must stop, not wait for rank 0
                failure = str(e)
        # A collective, so also a barrier: nobody runs ahead (or exits) while rank 0 is still writing.
        if failure := gather_objects(failure, ctx)[0]:
            raise TrainingError(failure)
        last_save = now()

    def first_non_finite(since: int) -> str | None:
        """Collective: a NaN on one rank must stop every rank at the same step, or the others hang."""
        return _non_finite_message(per_rank_values(meter.first_bad_step(since, global_step), ctx))

    def safe_to_save(since: int) -> str | None:
        """Why the current weights must not be saved (non-finite anywhere), or None."""
        problem = first_non_finite(since)
        bad_params = torch.tensor([float(not all(torch.isfinite(p).all() for p in params))], device=ctx.device)
        if problem is None and all_reduce_max(bad_params).item():
            problem = f"non-finite parameters at step {global_step}"
        return problem

    t_start = last_save = now()
    first_epoch = epoch
    samples_trained, train_seconds, diverged = 0, 0.0, None
    checked = len(meter)  # steps of this epoch already checked for non-finite values

    while epoch < cfg.epochs and not diverged:
        # The shuffle is a permutation seeded by seed + epoch: without set_epoch every epoch repeats epoch 0's order.
        if bug != "no-set-epoch":
            sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), dtype=torch.long, device=ctx.device)
        if bug != "no-train-mode":
            model.train()  # dropout on, BatchNorm uses (and updates) batch statistics; validation switched it off
        trained_in_train_mode = model.training
        t_epoch = now()
        for position in range(step_in_epoch, steps_per_epoch):
            idx = order[position * step_batch:(position + 1) * step_batch]
            # Gradient accumulation: the step's batch is cut into micro-batches of --batch-size whose gradients add
            # up in .grad; only the last one's backward all-reduces. At --grad-accum-steps 1 it is one plain batch.
            micro_batches = idx.split(cfg.batch_size) if accumulate else (idx,)
            for micro, micro_idx in enumerate(micro_batches):
                x, y = data.train_x[micro_idx], data.train_y[micro_idx]
                sync = micro == len(micro_batches) - 1 and bug != "no-grad-sync"
                with grad_sync(ddp_model, sync):  # no_sync() unless sync: skip the all-reduce (forward AND backward)
                    logits = ddp_model(x)  # forward
                    if bug == "softmax-logits":
                        logits = logits.softmax(1)  # the loss applies log-softmax itself: this squashes it twice
                    loss = loss_fn(logits, y)  # mean over this rank's batch; DDP's averaging makes it the global mean
                    if accumulate:  # weighted by its share of the step's samples: .grad sums to the step's mean
                        loss = loss * (len(micro_idx) / len(idx))
                    loss.backward()  # gradients; under DDP, all-reduced across ranks as they are produced
                if micro == 0:
                    step_loss, step_correct = loss.detach(), (logits.argmax(1) == y).sum()
                else:  # accumulating: the step's loss and correct count are sums over its micro-batches
                    step_loss, step_correct = step_loss + loss.detach(), step_correct + (logits.argmax(1) == y).sum()
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            if cfg.grad_clip:
                torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, grad_norm)
            optimizer.step()
            # .grad accumulates by default: without this, every step would also re-apply all earlier gradients.
            if bug != "no-zero-grad":
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            per_sample = step_loss / len(idx) if bug == "sum-loss" else step_loss  # logs stay per-sample either way
            meter.record(per_sample, step_correct, grad_norm, len(idx))
            global_step += 1

            if global_step % cfg.log_every == 0:  # the only host syncs inside an epoch
                if diverged := first_non_finite(checked):
                    break
                checked = len(meter)
                _log_step(logger, meter, global_step, scheduler.get_last_lr()[0], epoch,
                          elapsed_before + now() - t_start, console=steps_per_epoch > cfg.log_every)
            if cfg.checkpoint_every_steps and global_step % cfg.checkpoint_every_steps == 0:
                if diverged := safe_to_save(checked):
                    break
                checked = len(meter)
                save(epoch, position + 1)
        if diverged:
            break
        epoch_seconds = now() - t_epoch
        broadcast_buffers(model)  # each rank's last step updated BatchNorm's running stats from its own shard
        val_sums = validation_sums(model, data.val_x, data.val_y, ctx, cfg.eval_batch_size, bug)
        validated_in_eval_mode = not model.training
        # One all-reduce for all the ranks must agree on after an epoch (each collective is a round trip):
        # train and validation sums and counts (global, then one division each), the non-finite check of the
        # steps not yet checked, each rank's shard fingerprint, and rank 0's clock for the time-based checkpoint.
        save_by_clock = 0 < cfg.checkpoint_every_seconds <= now() - last_save
        order_fingerprint = fingerprint(order)
        totals = meter.end_of_epoch(ctx, checked, global_step, int(order_fingerprint[:13], 16), save_by_clock,
                                    extra=val_sums)
        if diverged := _non_finite_message(totals.bad_steps):
            break
        train_seconds += epoch_seconds
        samples_trained += sum(meter.sizes) * ctx.world_size

        train_loss, train_acc = totals.loss, totals.acc
        step_losses, step_grad_norms = meter.series(0)  # this rank's; rank 0's go to the log
        if tracker["first_step_loss"] is None:
            tracker["first_step_loss"] = step_losses[0]
        # rank0-val: the unreduced sums, so each rank reports its own shard, and rank 0's gets logged.
        val_loss_sum, val_correct, val_count = val_sums.tolist() if bug == "rank0-val" else totals.extra
        val_loss, val_acc = val_loss_sum / val_count, val_correct / val_count
        epoch, step_in_epoch, checked, meter = epoch + 1, 0, 0, EpochMeter()
        if not math.isfinite(val_loss):  # reduced over ranks, so every rank takes this branch together
            diverged = f"non-finite validation loss after epoch {epoch}"

        row = {"epoch": epoch, "step": global_step, "train_loss": train_loss, "train_acc": train_acc,
               "val_loss": val_loss, "val_acc": val_acc, "lr": scheduler.get_last_lr()[0],
               "grad_norm": sum(step_grad_norms) / len(step_grad_norms),
               "samples_per_sec": len(sampler) * ctx.world_size / epoch_seconds, "epoch_seconds": epoch_seconds,
               "order_fingerprint": order_fingerprint, "step_losses": step_losses, "step_grad_norms": step_grad_norms,
               "shard_fingerprints": totals.shard_fingerprints,
               "trained_in_train_mode": trained_in_train_mode, "validated_in_eval_mode": validated_in_eval_mode}
        tracker["final"] = {k: row[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc")}
        if train_acc == 1.0 and tracker["epochs_to_100_train_acc"] is None:
            tracker["epochs_to_100_train_acc"], tracker["steps_to_100_train_acc"] = epoch, global_step
        if train_loss <= cfg.target_loss and tracker["epochs_to_target_loss"] is None:
            tracker["epochs_to_target_loss"], tracker["steps_to_target_loss"] = epoch, global_step
        # Saving costs a write and an fsync (tens of ms), far more than a tiny epoch: the default cadence is by
        # time. Rank 0's clock decides (totals.rank0_flag), so every rank enters the save's collectives together.
        every_n = cfg.checkpoint_every_epochs and epoch % cfg.checkpoint_every_epochs == 0
        due = bool(every_n) or totals.rank0_flag or epoch == cfg.epochs
        is_best = due and val_loss < tracker["best_val_loss"]
        if is_best:
            tracker.update(best_val_loss=val_loss, best_val_acc=val_acc, best_epoch=epoch, best_step=global_step)
        logger.epoch(row)
        if epoch % cfg.print_every == 0 or epoch == cfg.epochs:
            elapsed = elapsed_before + now() - t_start
            eta = (now() - t_start) / (epoch - first_epoch) * (cfg.epochs - epoch)
            logger.table_row(dict(row, **{"samples/s": row["samples_per_sec"]},
                                  elapsed=fmt_seconds(elapsed), eta=fmt_seconds(eta)))
        if diverged:
            break
        # best.pt is the best of the checkpoints the cadence writes: saving every improvement would cost a
        # write and an fsync per epoch on tiny runs, where epochs take milliseconds.
        if due:
            if diverged := safe_to_save(0):
                break
            save(epoch, 0, best=is_best)

    loop_seconds = now() - t_start  # the epochs and all they do: steps, validation, logging, checkpoints
    if diverged:
        say(f"stopped: {diverged}; no checkpoint written after the last finite one")
        if len(meter):  # keep the steps that led up to it: the evidence of how the run blew up
            step_losses, step_grad_norms = meter.series(0)
            logger.partial_epoch({"epoch": epoch + 1, "step": global_step, "partial": True, "train_loss": None,
                                  "step_losses": step_losses, "step_grad_norms": step_grad_norms})
    # Bitwise fingerprints of every rank's weights: DDP keeps replicas identical, so these must all be equal.
    replica_checksums = gather_objects(fingerprint(*params), ctx)
    # The reference the validation above must match: the correct evaluate() on rank 0's final weights.
    broadcast_buffers(model)
    exact_val = evaluate(model, data.val_x, data.val_y, ctx, cfg.eval_batch_size) if epoch else None
    summary = {
        "config": cfg.to_dict(), "world_size": ctx.world_size, "backend": ctx.backend, "device": str(ctx.device),
        "threads_per_rank": ctx.threads,
        "final": tracker.get("final"),
        "best": {"val_loss": tracker["best_val_loss"], "val_acc": tracker["best_val_acc"],
                 "epoch": tracker["best_epoch"], "step": tracker["best_step"]},
        "epochs_to_100_train_acc": tracker["epochs_to_100_train_acc"],
        "steps_to_100_train_acc": tracker["steps_to_100_train_acc"],
        "target_loss": cfg.target_loss,
        "epochs_to_target_loss": tracker["epochs_to_target_loss"],
        "steps_to_target_loss": tracker["steps_to_target_loss"],
        "initial_loss": tracker["initial_loss"], "first_step_loss": tracker["first_step_loss"],
        "ln_num_classes": math.log(data.num_classes),
        "epochs_completed": epoch, "global_step": global_step,
        "wall_seconds": elapsed_before + now() - t_start,
        "loop_seconds": loop_seconds,
        "train_samples_per_sec": samples_trained / train_seconds if train_seconds else None,
        "diverged": diverged is not None, "divergence": diverged,
        "break": bug or None,
        "exact_val": {"val_loss": exact_val[0], "val_acc": exact_val[1]} if exact_val else None,
        "symptoms": [],
        "replica_checksums": replica_checksums,
        "checkpoints": {"last": str(ckpt_dir / "last.pt"), "best": str(ckpt_dir / "best.pt")},
    }
    summary = _finite_or_none(summary)
    if ctx.is_main:
        logger.flush()
        summary["symptoms"] = detect_symptoms(summary, read_run(run_dir)[1])
    # The HParams dashboard: configuration (plus the world size) against outcomes, diverged runs included.
    outcomes = dict(summary["final"] or dict.fromkeys(("train_loss", "train_acc", "val_loss", "val_acc")),
                    diverged=float(summary["diverged"]), epochs_to_target_loss=summary["epochs_to_target_loss"],
                    train_samples_per_sec=summary["train_samples_per_sec"])
    logger.hparams(dict(cfg.to_dict(), world_size=ctx.world_size), outcomes)
    logger.summary(summary)
    logger.close()
    if summary["final"]:
        f = {k: "n/a" if v is None else f"{v:.4g}" if "loss" in k else f"{v:.2%}" for k, v in summary["final"].items()}
        say(f"done: {epoch} epochs, {global_step} steps, {fmt_seconds(summary['wall_seconds'])}; train loss "
            f"{f['train_loss']} acc {f['train_acc']}, val loss {f['val_loss']} acc {f['val_acc']}")
        milestones = (("100% train accuracy", "100_train_acc"), (f"train loss <= {cfg.target_loss:g}", "target_loss"))
        for what, key in milestones:
            at_epoch, at_step = summary[f"epochs_to_{key}"], summary[f"steps_to_{key}"]
            say(f"{what}: " + (f"first reached at epoch {at_epoch}, step {at_step}" if at_epoch else "not reached"))
    return summary


def _log_step(logger: RunLogger, meter: EpochMeter, step: int, lr: float, epoch: int, elapsed: float,
              console: bool) -> None:
    """Per-step scalars for TensorBoard, sampled every --log-every steps; a console line in long epochs."""
    losses, norms = meter.series(len(meter) - 1)
    logger.step_scalars(step, losses[0], lr, norms[0])
    if console:
        logger.table_row({"epoch": epoch + 1, "step": step, "train_loss": losses[0], "lr": lr,
                          "grad_norm": norms[0], "elapsed": fmt_seconds(elapsed)})


def _non_finite_message(bad_steps: list[float]) -> str | None:
    """The first non-finite step over all ranks (0 = none on that rank, +0.5 = only the gradient), or None."""
    if not any(bad_steps):
        return None
    first = min(s for s in bad_steps if s)
    return f"non-finite {'gradient' if first % 1 else 'loss'} at step {int(first)} on rank {bad_steps.index(first)}"


def _finite_or_none(value):
    """JSON has no NaN or inf: they become null."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _load_resume(cfg: Config, ctx: DistContext, ckpt_dir: Path, run_dir: Path, fingerprint: str, say):
    """The checkpoint to continue from, or None; refuses to silently overwrite an earlier run."""
    ckpt.ensure_writable(ckpt_dir, "--checkpoints-dir")  # fail now, not at the first save an hour in
    ckpt.ensure_writable(run_dir, "--runs-dir")
    if cfg.resume == "auto":
        found = ckpt.load_latest(ckpt_dir, say=say)
        if found is None:
            say(f"--resume auto: no checkpoint in {ckpt_dir}, starting fresh")
    elif cfg.resume:
        path = Path(cfg.resume)
        if not path.is_file():
            raise UsageError(f"--resume: no checkpoint file at {path}")
        try:
            found = ckpt.load_checkpoint(path), path
        except TrainingError as e:
            raise UsageError(f"--resume: {e}") from None
    else:
        found = None
        existing = [d for d in (run_dir, ckpt_dir) if d.exists() and any(d.iterdir())]
        if existing and not cfg.overwrite:
            raise UsageError(f"run {cfg.run_name!r} already exists ({existing[0]}); pass --resume auto to continue it, "
                             "--overwrite to replace it, or another --run-name")
    if found:
        ckpt.check_compatible(found[0], cfg.to_dict(), fingerprint, ctx.world_size)
    if ctx.is_main:  # no writer is alive at start-up: temp files are what a crashed save left behind
        for leftover in ckpt.clean_temp_files(ckpt_dir):
            say(f"removed {leftover}, left by a checkpoint write that crashed")
    return found


@record
def main(argv: list[str] | None = None) -> int:
    rank = launch_env()[0]
    try:
        cfg = parse_config(argv)
        with distributed_session(cfg.device, cfg.threads, cfg.pg_timeout) as ctx:
            summary = train(cfg, ctx)
        return 3 if summary["diverged"] else 0
    except UsageError as e:
        if rank == 0:  # every rank validates the same flags; one message is enough
            print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingError as e:
        print(f"train.py: error on rank {rank}: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
