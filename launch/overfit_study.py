"""Which hyperparameters matter for overfitting the small set, and what breaks when they change.

    python -m launch.overfit_study [--out reports/overfit] [--epochs 100]

Varies one thing at a time around the default recipe (moons, 200 samples, MLP 64-64,
Adam lr 0.01, batch 32) and writes reports/overfit/study.md (a table of how each run
ended) plus one PNG of train-loss curves per dimension, and the decision boundary
of the default run (boundary.png).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from launch import figures
from launch.runner import RunRecord, run
from spine.checkpoint import load_for_eval
from spine.symptoms import outcome

# dimension -> [(label, train.py flags)], each varying one thing from the defaults
STUDY: dict[str, list[tuple[str, list[str]]]] = {
    "learning rate (Adam)": [(f"lr {lr:g}", ["--lr", str(lr)]) for lr in (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)],
    "learning rate (SGD)": [(f"lr {lr:g}", ["--optimizer", "sgd", "--lr", str(lr)]) for lr in (0.01, 0.1, 1.0, 10.0)],
    "width (2 hidden layers)": [(f"{w},{w}", ["--hidden", f"{w},{w}"]) for w in (1, 2, 4, 16, 64, 256)],
    "depth (width 64)": [("linear (0)", ["--model", "linear"])]
    + [(f"{d} layer{'s' if d > 1 else ''}", ["--hidden", ",".join(["64"] * d)]) for d in (1, 2, 4)],
    "batch size": [("8", ["--batch-size", "8"]), ("32", ["--batch-size", "32"]),
                   ("160 (full batch)", ["--batch-size", "160"])],
    "optimizer": [("SGD lr 0.1", ["--optimizer", "sgd", "--lr", "0.1"]),
                  ("SGD+momentum 0.9 lr 0.1", ["--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9"]),
                  ("Adam lr 0.01", ["--optimizer", "adam", "--lr", "0.01"])],
    "data difficulty": [("linear, noise 0.1", ["--dataset", "linear"]), ("moons, noise 0.1", []),
                        ("moons, noise 0.3", ["--noise", "0.3"]), ("circles, noise 0.1", ["--dataset", "circles"]),
                        ("spirals, noise 0.1", ["--dataset", "spirals"])],
}


def run_study(out: Path, epochs: int) -> dict[str, list[tuple[str, RunRecord]]]:
    results: dict[str, list[tuple[str, RunRecord]]] = {}
    for dim, variants in STUDY.items():
        results[dim] = []
        for i, (label, flags) in enumerate(variants):
            name = f"{_slug(dim)}-{i}"
            args = ["--epochs", str(epochs), "--no-tensorboard", "--print-every", "100000",
                    "--checkpoint-every-epochs", "100000"] + flags
            results[dim].append((label, run(args, out / "study-runs", name, overwrite=True)))
    return results


def table(results: dict[str, list[tuple[str, RunRecord]]], epochs: int) -> str:
    lines = [f"| varied | value | outcome ({epochs}-epoch budget) | epochs to 100% acc | final train loss "
             "| final train acc | final val acc |", "|---|---|---|---:|---:|---:|---:|"]
    for dim, runs in results.items():
        for label, r in runs:
            s, f = r.summary, r.summary.get("final") or {}
            lines.append(f"| {dim} | {label} | {outcome(s, r.metrics)} | {s.get('epochs_to_100_train_acc') or '—'} "
                         f"| {_num(f.get('train_loss'))} | {_pct(f.get('train_acc'))} | {_pct(f.get('val_acc'))} |")
    return "\n".join(lines)


def study_figures(results: dict[str, list[tuple[str, RunRecord]]], out: Path) -> list[Path]:
    paths = []
    for dim, runs in results.items():
        fig, (ax,) = figures.panels(1, size=(6, 4))
        for label, r in runs:
            losses = figures.finite(r.curve("train_loss"))
            ax.plot(range(1, len(losses) + 1), losses, label=label)
        ax.set_yscale("log")
        ax.axhline(1e-3, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="epoch", ylabel="train loss (log)", title=f"Overfit study: {dim}")
        ax.legend(fontsize=8)
        paths.append(figures.save(fig, out / f"study-{_slug(dim)}.png"))
    return paths


def boundary_figure(checkpoint: Path, path: Path) -> None:
    """The learned decision boundary over the training points, from a saved checkpoint."""
    model, cfg, data, state = load_for_eval(checkpoint)
    xs = torch.cat([data.train_x, data.val_x])
    lo, hi = xs.min(0).values - 0.5, xs.max(0).values + 0.5
    gx, gy = torch.meshgrid(torch.linspace(lo[0], hi[0], 300), torch.linspace(lo[1], hi[1], 300), indexing="xy")
    with torch.no_grad():
        prob = model(torch.stack([gx.flatten(), gy.flatten()], 1)).softmax(1)[:, 1].reshape(gx.shape)
    fig, (ax,) = figures.panels(1, size=(5.5, 4.5))
    ax.contourf(gx, gy, prob, levels=20, cmap="RdBu_r", alpha=0.6)
    ax.contour(gx, gy, prob, levels=[0.5], colors="k", linewidths=1.2)
    ax.scatter(*data.train_x.T, c=data.train_y, cmap="RdBu_r", edgecolors="k", s=18, label="train")
    ax.scatter(*data.val_x.T, c=data.val_y, cmap="RdBu_r", marker="^", edgecolors="k", s=28, label="val")
    ax.set_title(f"{cfg.dataset}: learned boundary (p=0.5), epoch {state['progress']['epoch']}")
    ax.legend(loc="lower left", fontsize=8)
    figures.save(fig, path)


def curves_figure(run: RunRecord, path: Path) -> None:
    """Loss and accuracy of the default run, train against validation."""
    epochs = range(1, len(run.metrics) + 1)
    fig, (ax1, ax2) = figures.panels(2)
    ax1.plot(epochs, run.curve("train_loss"), label="train")
    ax1.plot(epochs, run.curve("val_loss"), label="validation")
    ax1.axhline(1e-3, color="grey", lw=0.8, ls="--", label="1e-3")
    ax1.axhline(math.log(2), color="grey", lw=0.8, ls=":", label="ln 2 (chance)")
    ax1.set(yscale="log", xlabel="epoch", ylabel="loss (log)", title="loss")
    ax2.plot(epochs, run.curve("train_acc"), label="train")
    ax2.plot(epochs, run.curve("val_acc"), label="validation")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0.4, 1.02))
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
    figures.save(fig, path, "Default recipe: moons, 200 samples, MLP 64-64, Adam lr 0.01, batch 32")


def _slug(text: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in text.lower())
    while "--" in slug:
        slug = slug.replace("--", "-")
    return slug.strip("-")


def _num(v) -> str:
    return "—" if v is None else f"{v:.2e}"


def _pct(v) -> str:
    return "—" if v is None else f"{v:.1%}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/overfit")
    p.add_argument("--epochs", type=int, default=100)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_study(out, args.epochs)
    text = ("Overfit study: one change at a time from the default recipe. Regenerate with `make overfit-study`.\n\n"
            + table(results, args.epochs) + "\n")
    (out / "study.md").write_text(text)
    study_figures(results, out)
    label, default_run = results["learning rate (Adam)"][2]
    assert label == "lr 0.01", "the default recipe is the third learning rate"
    boundary_figure(out / "study-runs" / "checkpoints" / default_run.name / "last.pt", out / "boundary.png")
    curves_figure(default_run, out / "curves.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
