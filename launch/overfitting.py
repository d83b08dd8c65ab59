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
from launch.stats import spread
from spine.checkpoint import load_for_eval

ARGS = ["--dataset", "moons", "--n-samples", "100", "--noise", "0.35", "--hidden", "256,256",
        "--optimizer", "adam", "--lr", "0.01", "--batch-size", "16", "--epochs", "300",
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


SEEDS = (0, 1, 2, 3, 4)  # --seed: initial weights, shuffle and nothing else; the data (--data-seed 0) is fixed


def run_seed(flags: list[str], out: Path, seed: int) -> dict:
    """One seed's run, its curves and both checkpoints scored on the fresh test set."""
    name = f"overfitting-s{seed}"
    run = run_train(flags + ["--seed", str(seed), "--no-tensorboard"], out / "overfitting-runs", name, overwrite=True)
    if run.returncode != 0:
        print(run.output, file=sys.stderr)
        raise SystemExit(f"overfitting: seed {seed} failed with exit code {run.returncode}")
    val = run.curve("val_loss")
    best_epoch = min(range(len(val)), key=val.__getitem__) + 1
    ckpt = out / "overfitting-runs" / "checkpoints" / name
    best, last = score(ckpt / "best.pt"), score(ckpt / "last.pt")
    m = run.metrics
    return {"seed": seed, "run": run, "best_epoch": best_epoch, "min_val_loss": val[best_epoch - 1],
            "final_val_loss": val[-1], "rise": val[-1] / val[best_epoch - 1],
            "train_acc_at_min": m[best_epoch - 1]["train_acc"],
            "doubled_by": next((e for e in range(best_epoch, len(val) + 1) if val[e - 1] >= 2 * val[best_epoch - 1]),
                               None),
            "memorised_at": next((e["epoch"] for e in m if e["train_acc"] == 1.0), None),
            "final_train_loss": m[-1]["train_loss"], "val_acc_at_min": m[best_epoch - 1]["val_acc"],
            "final_val_acc": m[-1]["val_acc"], "best": best, "last": last}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/overfitting")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--seeds", type=int, default=len(SEEDS), help="seeds 0..N-1 (tests use fewer)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flags = [a if a != "300" else str(args.epochs) for a in ARGS]
    seeds = [run_seed(flags, out, s) for s in range(args.seeds)]
    pct = "{:.1%}"
    lines = [
        f"Overfitting: {' '.join(flags)}, seeds 0-{args.seeds - 1} (`--seed`: initial weights and shuffle; the "
        "data are the same). Each checkpoint also scored on 5,000 fresh points of the same distribution. "
        "Regenerate with `make overfitting`.",
        "",
        "| seed | lowest val loss: epoch | val loss there | final val loss (× the lowest) | first 100% train acc | "
        "test loss best.pt / last.pt | test acc best.pt / last.pt |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in seeds:
        lines.append(f"| {r['seed']} | {r['best_epoch']} | {r['min_val_loss']:.3g} | {r['final_val_loss']:.3g} "
                     f"({r['rise']:.1f}×) | {r['memorised_at'] or 'never'} | {r['best'][0]:.3g} / {r['last'][0]:.3g} "
                     f"| {r['best'][1]:.1%} / {r['last'][1]:.1%} |")

    def over(key, fmt="{:.3g}", of=lambda r, k: r[k]):
        return spread([of(r, key) for r in seeds], fmt)

    acc_gain = [r["best"][1] - r["last"][1] for r in seeds]
    best_acc, last_acc = [r["best"][1] for r in seeds], [r["last"][1] for r in seeds]
    overlap = min(best_acc) <= max(last_acc) and min(last_acc) <= max(best_acc)
    lines += ["", f"Median [min–max] over the {args.seeds} seeds: validation loss lowest at epoch "
              f"{over('best_epoch', '{:g}')} ({over('min_val_loss')}), final {over('final_val_loss')} "
              f"({over('rise', '{:.1f}')}× the lowest); doubled by epoch {over('doubled_by', '{:g}')}. "
              f"Train accuracy at the minimum {over('train_acc_at_min', pct)}, first 100% at epoch "
              f"{over('memorised_at', '{:g}')}; final train loss {over('final_train_loss')}. "
              f"Validation accuracy {over('val_acc_at_min', pct)} at the minimum, {over('final_val_acc', pct)} at "
              f"the end. On the fresh points: test loss {spread([r['best'][0] for r in seeds])} for best.pt against "
              f"{spread([r['last'][0] for r in seeds])} for last.pt; test accuracy {spread(best_acc, pct)} against "
              f"{spread(last_acc, pct)} (best − last per seed {spread(acc_gain, '{:+.1%}')}): "
              + ("the accuracy ranges overlap, not distinguishable from noise." if overlap else
                 "the accuracy ranges do not overlap.")]
    text = "\n".join(lines) + "\n"
    (out / "overfitting.md").write_text(text)
    figure(seeds, out / "overfitting.png")
    print(text)
    return 0


def figure(seeds: list[dict], path: Path) -> None:
    """Every seed faint, seed 0 bold; its lowest validation loss marked."""
    fig, (ax1, ax2) = figures.panels(2)
    for r in seeds:
        run, bold = r["run"], r["seed"] == 0
        epochs = range(1, len(run.metrics) + 1)
        style = {"lw": 1.6 if bold else 0.7, "alpha": 1.0 if bold else 0.35}
        ax1.plot(epochs, run.curve("train_loss"), color="C0", label="train" if bold else None, **style)
        ax1.plot(epochs, run.curve("val_loss"), color="C1", label="validation" if bold else None, **style)
        ax2.plot(epochs, run.curve("train_acc"), color="C0", label="train" if bold else None, **style)
        ax2.plot(epochs, run.curve("val_acc"), color="C1", label="validation" if bold else None, **style)
        assert math.isfinite(run.curve("val_loss")[-1])
    best_epoch = seeds[0]["best_epoch"]
    ax1.axvline(best_epoch, color="grey", ls="--", lw=0.8, label=f"seed 0's lowest val loss (epoch {best_epoch})")
    ax2.axvline(best_epoch, color="grey", ls="--", lw=0.8)
    ax1.set(yscale="log", xlabel="epoch", ylabel="loss (log)", title="loss")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
    figures.save(fig, path, f"Overfitting: 80 noisy training points, MLP 256-256 ({len(seeds)} seeds, seed 0 bold)")


if __name__ == "__main__":
    sys.exit(main())
