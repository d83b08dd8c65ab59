"""What a run says about itself: the header before the first epoch, summary.json and the closing lines after
the last. Everything here is reporting; nothing changes what is trained."""

from __future__ import annotations

import math

import torch

from data import SplitDataset
from spine.config import Config
from spine.distributed import DistContext
from spine.logger import RunLogger, fmt_seconds, read_run
from spine.metrics import EpochTotals
from spine.state import TrainState
from spine.symptoms import detect as detect_symptoms


def header(cfg: Config, ctx: DistContext, data: SplitDataset, model: torch.nn.Module, steps_per_epoch: int,
           state: TrainState) -> list[tuple[str, str]]:
    accumulated = f" x {cfg.grad_accum_steps} accumulated" if cfg.grad_accum_steps > 1 else ""
    global_batch = cfg.batch_size * cfg.grad_accum_steps * ctx.world_size
    return [
        ("run", f"{cfg.run_name}  (logs {cfg.run_dir()}, checkpoints {cfg.checkpoint_dir()})"),
        ("world", f"{ctx.world_size} rank(s), backend {ctx.backend}, device {ctx.device}, "
                  f"{ctx.threads} thread(s) per rank"),
        ("batch", f"{cfg.batch_size} per rank{accumulated}, {global_batch} global, {steps_per_epoch} steps per epoch"),
        ("data", f"{cfg.dataset}: {len(data.train_x)} train / {len(data.val_x)} val, "
                 f"{'x'.join(map(str, data.input_shape))}{'-d' if len(data.input_shape) == 1 else ''}, "
                 f"{data.num_classes} classes, fingerprint {data.fingerprint}"),
        ("model", f"{cfg.model} {list(cfg.hidden)}, {sum(p.numel() for p in model.parameters()):,} parameters"
                  f"{', batchnorm' if cfg.batchnorm else ''}{', sync-batchnorm' if cfg.sync_batchnorm else ''}"),
        ("precision", f"{cfg.precision}" + {"fp32": "", "bf16": " (torch.autocast)",
                                             "fp16": " (torch.autocast, GradScaler)"}[cfg.precision]
                      + (", torch.compile (training forward; validation eager)" if cfg.compile else ", eager")),
        ("optimizer", f"{cfg.optimizer} lr {cfg.lr:g}, schedule {cfg.schedule}, warmup {cfg.warmup_steps}, "
                      f"grad clip {cfg.grad_clip or 'off'}"),
        ("initial loss", f"{state.initial_loss:.4f}  (ln K = {math.log(data.num_classes):.4f} for "
                         f"K = {data.num_classes})"),
    ]


def epoch_row(state: TrainState, totals: EpochTotals, val: tuple[float, float], lr: float, epoch_seconds: float,
              samples: int, order_fingerprint: str, modes: tuple[bool, bool]) -> dict:
    """One line of metrics.jsonl: the completed epoch's global metrics, this rank's per-step series, and the
    facts the symptom detectors read (order and shard fingerprints, the modes seen)."""
    step_losses, step_grad_norms = totals.step_losses, totals.step_grad_norms
    measured = [v for v in step_grad_norms if v is not None]
    return {"epoch": state.epoch + 1, "step": state.global_step, "train_loss": totals.loss, "train_acc": totals.acc,
            "val_loss": val[0], "val_acc": val[1], "lr": lr,
            "grad_norm": sum(measured) / len(measured) if measured else None,
            "samples_per_sec": samples / epoch_seconds, "epoch_seconds": epoch_seconds,
            "order_fingerprint": order_fingerprint, "step_losses": step_losses, "step_grad_norms": step_grad_norms,
            "shard_fingerprints": totals.shard_fingerprints, "scaler_skipped_steps": totals.skipped_steps,
            "trained_in_train_mode": modes[0], "validated_in_eval_mode": modes[1]}


def build(cfg: Config, ctx: DistContext, state: TrainState, data: SplitDataset, *, loop_seconds: float,
          train_seconds: float, samples_trained: int, stopped: str | None, exact_val: tuple[float, float] | None,
          replica_checksums: list, instruments: dict) -> dict:
    summary = {
        "config": cfg.to_dict(), "world_size": ctx.world_size, "backend": ctx.backend, "device": str(ctx.device),
        "threads_per_rank": ctx.threads,
        "precision": cfg.precision, "compile": cfg.compile,
        "final": state.final,
        "best": state.best,
        **state.milestones,
        "target_loss": cfg.target_loss,
        "initial_loss": state.initial_loss, "first_step_loss": state.first_step_loss,
        "ln_num_classes": math.log(data.num_classes),
        "epochs_completed": state.epoch, "global_step": state.global_step,
        "wall_seconds": state.elapsed(),
        "loop_seconds": loop_seconds,
        "train_samples_per_sec": samples_trained / train_seconds if train_seconds else None,
        "diverged": stopped is not None, "divergence": stopped,
        "break": cfg.break_ or None,
        "exact_val": {"val_loss": exact_val[0], "val_acc": exact_val[1]} if exact_val else None,
        "symptoms": [],
        "replica_checksums": replica_checksums,
        "instruments": instruments,
        "checkpoints": {"last": str(cfg.checkpoint_dir() / "last.pt"), "best": str(cfg.checkpoint_dir() / "best.pt")},
    }
    return _finite_or_none(summary)


def finish(summary: dict, cfg: Config, ctx: DistContext, logger: RunLogger) -> None:
    """Symptoms from the files just written, the HParams record, summary.json, and the closing console lines."""
    if ctx.is_main:
        logger.flush()
        rows = read_run(cfg.run_dir())[1]
        summary["symptoms"] = detect_symptoms(summary, rows)
        # fp16: steps the GradScaler skipped (inf/NaN gradients, never applied), over every attempt of the run.
        summary["scaler_skipped_steps"] = sum(row.get("scaler_skipped_steps", 0) for row in rows)
    # The HParams dashboard: configuration (plus the world size) against outcomes, diverged runs included.
    outcomes = dict(summary["final"] or dict.fromkeys(("train_loss", "train_acc", "val_loss", "val_acc")),
                    diverged=float(summary["diverged"]), epochs_to_target_loss=summary["epochs_to_target_loss"],
                    train_samples_per_sec=summary["train_samples_per_sec"])
    logger.hparams(dict(cfg.to_dict(), world_size=ctx.world_size), outcomes)
    logger.summary(summary)
    logger.close()
    if not (ctx.is_main and summary["final"]):
        return
    f = {k: "n/a" if v is None else f"{v:.4g}" if "loss" in k else f"{v:.2%}" for k, v in summary["final"].items()}
    print(f"done: {summary['epochs_completed']} epochs, {summary['global_step']} steps, "
          f"{fmt_seconds(summary['wall_seconds'])}; train loss {f['train_loss']} acc {f['train_acc']}, "
          f"val loss {f['val_loss']} acc {f['val_acc']}", flush=True)
    for what, key in (("100% train accuracy", "100_train_acc"), (f"train loss <= {cfg.target_loss:g}", "target_loss")):
        at_epoch, at_step = summary[f"epochs_to_{key}"], summary[f"steps_to_{key}"]
        print(f"{what}: " + (f"first reached at epoch {at_epoch}, step {at_step}" if at_epoch else "not reached"),
              flush=True)


def _finite_or_none(value):
    """JSON has no NaN or inf: they become null."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
