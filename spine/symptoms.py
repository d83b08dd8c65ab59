"""Read a finished run's numbers and name what went wrong, so nobody has to eyeball curves.

Each detector looks at summary.json and metrics.jsonl only (what any run
leaves behind), with thresholds stated next to it. The set:

  diverged         non-finite loss/gradient, or a train loss that ends above 3x its initial value
  plateau          train loss still above 0.05 and improving by < 5% over the last quarter of the epochs
  oscillation      step-to-step loss jitter above 30% of the loss level over the second half, while the
                   loss is still above 0.05 (a converged loss near 0 jitters in relative terms harmlessly)
  train-val-gap    final validation loss above 2x train loss + 0.1 (worse on held-out data than the model
                   is on its own training data, beyond what this clean data explains)
  val-mismatch     the validation metric the run reported differs from an exact single-pass evaluation
  repeated-order   two epochs visited the training data in the same order
  replicas-diverged  ranks ended with different weights (DDP keeps them bitwise equal)
  overlapping-shards two ranks visited the same training order in an epoch (each should get a disjoint 1/world)
  trained-in-eval-mode    the model was not in train mode while it trained (dropout off, BatchNorm frozen)
  validated-in-train-mode the model was still in train mode while it was validated
  loss-spike       two consecutive training steps with a loss above 1.5x the initial loss: on those batches
                   the model did worse than at initialisation (e.g. the first batches of a class it has not
                   seen for a while). One step alone is not enough: a 2-sample last batch can spike by chance.
"""

from __future__ import annotations

import math
import statistics

ACTIVE_LOSS = 0.05  # below this a run is in the memorisation tail, where relative jitter means nothing


def detect(summary: dict, metrics: list[dict]) -> list[str]:
    found = []
    steps_all = [v for m in metrics for v in m.get("step_losses", [])]  # a diverged run's last, partial row too
    metrics = [m for m in metrics if not m.get("partial")]
    losses = [m["train_loss"] for m in metrics]
    initial = summary.get("initial_loss")
    if summary.get("diverged") or any(not _finite(v) for v in losses):
        found.append("diverged")
    elif losses and initial and losses[-1] > 3 * initial:
        found.append("diverged")
    if "diverged" not in found and len(losses) >= 8:
        quarter = losses[-max(2, len(losses) // 4):]
        if quarter[-1] > ACTIVE_LOSS and quarter[-1] > 0.95 * quarter[0]:
            found.append("plateau")
        steps = [v for m in metrics[len(metrics) // 2:] for v in m.get("step_losses", [])]
        if len(steps) >= 8 and all(_finite(v) for v in steps):
            level = statistics.fmean(steps)
            jitter = statistics.fmean(abs(b - a) for a, b in zip(steps, steps[1:], strict=False))
            if level > ACTIVE_LOSS and jitter > 0.3 * level:
                found.append("oscillation")
    final = summary.get("final") or {}
    if _finite(final.get("val_loss")) and _finite(final.get("train_loss")):
        if final["val_loss"] > 2 * final["train_loss"] + 0.1:
            found.append("train-val-gap")
    exact = summary.get("exact_val")
    if exact and _finite(exact.get("val_loss")) and _finite(final.get("val_loss")):
        if abs(exact["val_loss"] - final["val_loss"]) > 1e-6 * max(1.0, abs(exact["val_loss"])) or \
                exact["val_acc"] != final["val_acc"]:
            found.append("val-mismatch")
    orders = [m.get("order_fingerprint") for m in metrics if m.get("order_fingerprint")]
    if len(orders) != len(set(orders)):
        found.append("repeated-order")
    if any(len(set(m["shard_fingerprints"])) < len(m["shard_fingerprints"]) for m in metrics
           if m.get("shard_fingerprints")):
        found.append("overlapping-shards")
    if any(m.get("trained_in_train_mode") is False for m in metrics):
        found.append("trained-in-eval-mode")
    if any(m.get("validated_in_eval_mode") is False for m in metrics):
        found.append("validated-in-train-mode")
    checksums = summary.get("replica_checksums") or []
    if len(set(checksums)) > 1:
        found.append("replicas-diverged")
    high = [_finite(v) and v > 1.5 * initial for v in steps_all] if initial else []
    if "diverged" not in found and any(a and b for a, b in zip(high, high[1:], strict=False)):
        found.append("loss-spike")
    return found


def outcome(summary: dict, metrics: list[dict]) -> str:
    """One word for a study table: how the run ended."""
    symptoms = detect(summary, metrics)
    if "diverged" in symptoms:
        return "diverges"
    if summary.get("epochs_to_target_loss"):
        return f"converges (epoch {summary['epochs_to_target_loss']})"
    if "oscillation" in symptoms:
        return "oscillates"
    if "plateau" in symptoms:
        acc = (summary.get("final") or {}).get("train_acc")
        return f"underfits (plateau, train acc {acc:.0%})" if acc is not None else "underfits"
    return "too slow for the budget"  # still improving when the epochs ran out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
