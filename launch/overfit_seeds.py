"""Overfit the default dataset with seeds 0-9 and tabulate how long each took.

    python -m launch.overfit_seeds [--out reports/overfit] [--seeds 10] [extra train.py flags...]

Exit code 1 if any seed misses 100% train accuracy or the loss target: "reliably" is a claim we check.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from launch.runner import run
from launch.stats import spread
from spine.checkpoint import load_for_eval

WORST = 5  # training points whose share of the train loss is reported


def final_weights(checkpoint: Path) -> dict[str, float]:
    """The final weights on the training and validation sets in eval mode: why validation sits below train.
    The epoch's train loss averages batches met during the epoch, so compare it with the final weights' too."""
    model, _cfg, data, _state = load_for_eval(checkpoint)
    with torch.no_grad():
        per_sample = torch.nn.functional.cross_entropy(model(data.train_x), data.train_y, reduction="none")
        val = torch.nn.functional.cross_entropy(model(data.val_x), data.val_y).item()
    worst = per_sample.sort(descending=True).values[:WORST].sum().item()
    return {"train": per_sample.mean().item(), "val": val, "worst_share": worst / per_sample.sum().item()}


CURVE_EPOCHS = (1, 2, 3, 6, 10, 20, 40, 100)  # the epochs of the healthy-curve table


def curve_table(records: list) -> list[str]:
    """What a healthy curve looks like, in numbers: train and validation loss and the grad norm (the epoch's last
    step) at a few epochs, median [min–max] over the seeds, after the loss before any step."""
    lines = ["", "The recipe's curve, every seed (median [min–max]); grad norm of each epoch's last step:", "",
             "| epoch | train loss (epoch mean) | validation loss | grad norm |", "|---:|---:|---:|---:|",
             f"| 0 (before training) | {spread([r.summary['initial_loss'] for r in records])} | | |"]
    for epoch in CURVE_EPOCHS:
        rows = [r.metrics[epoch - 1] for r in records if len(r.metrics) >= epoch]
        if rows:
            lines.append(f"| {epoch} | {spread([m['train_loss'] for m in rows])} | "
                         f"{spread([m['val_loss'] for m in rows])} | {spread([m['grad_norm'] for m in rows])} |")
    return lines


def seed_table(out: Path, seeds: int, extra: list[str]) -> tuple[str, bool]:
    rows, ok, weights, records = [], True, [], []
    for seed in range(seeds):
        # --log-every 5: the grad norm of every epoch's last step (5 steps per epoch); logging changes no weight.
        flags = ["--seed", str(seed), "--no-tensorboard", "--print-every", "1000", "--checkpoint-every-epochs", "1000",
                 "--log-every", "5"]
        r = run(flags + extra, out, f"seed{seed}", overwrite=True)
        records.append(r)
        s = r.summary
        reached = r.returncode == 0 and s["epochs_to_100_train_acc"] and s["epochs_to_target_loss"]
        ok = ok and bool(reached)
        weights.append((s["final"]["train_loss"], final_weights(r.ckpt_dir / "last.pt")))
        rows.append((seed, s["epochs_to_100_train_acc"], s["steps_to_100_train_acc"], s["epochs_to_target_loss"],
                     s["steps_to_target_loss"], s["final"]["train_loss"], s["final"]["val_acc"], s["wall_seconds"]))
    lines = ["| seed | epochs to 100% acc | steps to 100% acc | epochs to loss ≤ 1e-3 | steps to loss ≤ 1e-3 "
             "| final train loss | final val acc | wall s |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append("| " + " | ".join("—" if v is None else (f"{v:.2e}" if isinstance(v, float) and v < 0.01 else
                                       f"{v:.3g}" if isinstance(v, float) else str(v)) for v in row) + " |")
    lines.append("")
    for label, col in (("epochs to 100% acc", 1), ("steps to 100% acc", 2), ("epochs to loss ≤ 1e-3", 3),
                       ("steps to loss ≤ 1e-3", 4)):
        values = [row[col] for row in rows if row[col] is not None]
        if values:
            lo, med, hi = min(values), statistics.median(values), max(values)
            lines.append(f"- {label}: min {lo}, median {med:g}, max {hi}")
    lines.append(f"\n{sum(1 for row in rows if row[1] and row[3])}/{len(rows)} seeds reached both targets.")
    lines += ["", "Validation below train, from each seed's final weights (eval mode; median [min–max] over seeds):",
              "",
              "| measured | value |", "|---|---:|",
              f"| last epoch's train loss (mean over its batches) | {spread([w[0] for w in weights])} |",
              f"| final weights on the training set | {spread([w[1]['train'] for w in weights])} |",
              f"| final weights on the validation set | {spread([w[1]['val'] for w in weights])} |",
              f"| share of the training loss carried by the {WORST} worst of the training points "
              f"| {spread([w[1]['worst_share'] for w in weights], '{:.0%}')} |"]
    lines += curve_table(records)
    return "\n".join(lines), ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/overfit")
    p.add_argument("--seeds", type=int, default=10)
    args, extra = p.parse_known_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table, ok = seed_table(out / "seed-runs", args.seeds, extra)
    header = ("Overfit reliability: default `train.py` settings, seeds 0-"
              f"{args.seeds - 1}. Regenerate with `make overfit-seeds`.\n\n")
    (out / "seeds.md").write_text(header + table + "\n")
    print(header + table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
