"""A real overfitting experiment: training accuracy keeps rising while validation loss turns upward.

    python -m launch.overfitting [--out reports/overfitting]

Few samples (100: 80 train, 20 validation) of heavily overlapping moons (noise 0.35, so some points sit
inside the other class's region), a large MLP (256-256) and a long budget (300 epochs). best.pt is chosen
by validation loss; since choosing on validation biases the validation number, both best.pt and last.pt
are then scored on a fresh test set of 5,000 points drawn from the same distribution with another data seed.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from data import build_dataset
from launch import figures
from launch.runner import run as run_train
from spine.checkpoint import load_for_eval

ARGS = ["--dataset", "moons", "--n-samples", "100", "--noise", "0.35", "--hidden", "256,256",
        "--optimizer", "adam", "--lr", "0.01", "--batch-size", "16", "--epochs", "300", "--seed", "0",
        "--print-every", "100000", "--keep-checkpoints", "2", "--checkpoint-every-epochs", "1"]  # best.pt: every epoch
TEST_SEED, TEST_SIZE = 12345, 5000


def score(checkpoint: Path) -> tuple[float, float, int]:
    """(test loss, test accuracy, epoch) of a checkpoint on fresh samples of the same distribution."""
    model, cfg, _, state = load_for_eval(checkpoint)
    test = build_dataset(cfg.dataset, TEST_SIZE, 0.5, cfg.noise, cfg.dim, cfg.classes, TEST_SEED)
    x, y = torch.cat([test.train_x, test.val_x]), torch.cat([test.train_y, test.val_y])
    with torch.no_grad():
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, y).item()
    return loss, (logits.argmax(1) == y).float().mean().item(), state["progress"]["epoch"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/overfitting")
    p.add_argument("--epochs", type=int, default=300)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flags = [a if a != "300" else str(args.epochs) for a in ARGS]
    run = run_train(flags + ["--no-tensorboard"], out / "overfitting-runs", "overfitting", overwrite=True)
    if run.returncode != 0:
        print(run.output, file=sys.stderr)
        print(f"overfitting: the run failed with exit code {run.returncode}", file=sys.stderr)
        return 1
    val = run.curve("val_loss")
    best_epoch = min(range(len(val)), key=val.__getitem__) + 1
    ckpt = out / "overfitting-runs" / "checkpoints" / "overfitting"
    best, last = score(ckpt / "best.pt"), score(ckpt / "last.pt")
    m = run.metrics
    lines = [
        f"Overfitting: {' '.join(flags)}. Regenerate with `make overfitting`.",
        "",
        "| | epoch | train loss | train acc | val loss | val acc | test loss (5,000 fresh) | test acc |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, (t_loss, t_acc, epoch) in (("best.pt (lowest val loss)", best), ("last.pt (end of training)", last)):
        e = m[epoch - 1]
        lines.append(f"| {label} | {epoch} | {e['train_loss']:.3g} | {e['train_acc']:.1%} | {e['val_loss']:.3g} "
                     f"| {e['val_acc']:.1%} | {t_loss:.3g} | {t_acc:.1%} |")
    low = m[best_epoch - 1]
    doubled = next((e for e in range(best_epoch, len(val) + 1) if val[e - 1] >= 2 * low["val_loss"]), None)
    memorised = next((e["epoch"] for e in m if e["train_acc"] == 1.0), None)
    lines += ["", f"Validation loss bottoms out at epoch {best_epoch}, step {low['step']} ({low['val_loss']:.3g}), "
              f"and ends at {val[-1]:.3g} ({val[-1] / low['val_loss']:.1f}x); "
              f"it has doubled by epoch {doubled or 'never'}. "
              f"Train accuracy keeps rising: {low['train_acc']:.1%} at the minimum, first 100% at epoch "
              f"{memorised or 'never'}; "
              f"train loss goes from {low['train_loss']:.3g} to {m[-1]['train_loss']:.3g}. "
              f"Early stopping on best.pt: test loss {best[0]:.3g} instead of {last[0]:.3g}, "
              f"test accuracy {best[1]:.1%} instead of {last[1]:.1%}."]
    text = "\n".join(lines) + "\n"
    (out / "overfitting.md").write_text(text)
    figure(run, best_epoch, out / "overfitting.png")
    print(text)
    return 0


def figure(run, best_epoch: int, path: Path) -> None:
    epochs = range(1, len(run.metrics) + 1)
    fig, (ax1, ax2) = figures.panels(2)
    ax1.plot(epochs, run.curve("train_loss"), label="train")
    ax1.plot(epochs, run.curve("val_loss"), label="validation")
    ax1.axvline(best_epoch, color="grey", ls="--", lw=0.8, label=f"lowest val loss (epoch {best_epoch})")
    ax1.set(yscale="log", xlabel="epoch", ylabel="loss (log)", title="loss")
    ax2.plot(epochs, run.curve("train_acc"), label="train")
    ax2.plot(epochs, run.curve("val_acc"), label="validation")
    ax2.axvline(best_epoch, color="grey", ls="--", lw=0.8)
    ax2.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
    figures.save(fig, path, "Overfitting: 80 noisy training points, MLP 256-256")
    assert math.isfinite(run.curve("val_loss")[-1])


if __name__ == "__main__":
    sys.exit(main())
