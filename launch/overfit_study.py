"""Which hyperparameters matter for overfitting the small set, and what breaks when they change.

    python -m launch.overfit_study [--out reports/overfit] [--epochs 100] [--seeds 5]

Varies one thing at a time around the default recipe (moons, 200 samples, MLP 64-64,
Adam lr 0.01, batch 32), each on seeds 0..N-1, and writes reports/overfit/study.md (how
each setting ended: median [min–max] over the seeds, and whether it left the default
recipe's own spread), one PNG of train-loss curves per dimension (median per setting),
and the decision boundary and curves of the default run, seed 0 (boundary.png, curves.png).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

from launch import figures
from launch.runner import RunRecord, run
from launch.stats import spread, verdict
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


Study = dict[str, list[tuple[str, list[RunRecord]]]]  # dimension -> [(setting, one run per seed)]


def run_study(out: Path, epochs: int, seeds: int) -> Study:
    results: Study = {}
    for dim, variants in STUDY.items():
        results[dim] = []
        for i, (label, flags) in enumerate(variants):
            args = ["--epochs", str(epochs), "--no-tensorboard", "--print-every", "100000",
                    "--checkpoint-every-epochs", "100000"] + flags
            runs = [run(args + ["--seed", str(s)], out / "study-runs", f"{_slug(dim)}-{i}-s{s}", overwrite=True)
                    for s in range(seeds)]
            results[dim].append((label, runs))
    return results


def _measures(runs: list[RunRecord]) -> dict[str, list]:
    return {"epochs to 100%": [r.summary.get("epochs_to_100_train_acc") for r in runs],
            "epochs to 1e-3": [r.summary.get("epochs_to_target_loss") for r in runs],
            "final loss": [None if r.summary.get("diverged") else (r.summary.get("final") or {}).get("train_loss")
                           for r in runs]}


def table(results: Study, epochs: int, default: list[RunRecord]) -> str:
    base = _measures(default)
    lines = [f"| varied | value | outcomes ({epochs}-epoch budget, per seed) | epochs to 100% acc "
             "| epochs to loss ≤ 1e-3 | final train loss | outside the default recipe's spread? |",
             "|---|---|---|---:|---:|---:|---|"]
    for dim, variants in results.items():
        for label, runs in variants:
            m = _measures(runs)
            kinds: dict[str, int] = {}
            for r in runs:
                word = outcome(r.summary, r.metrics).split(" (")[0]
                kinds[word] = kinds.get(word, 0) + 1
            outcomes = ", ".join(f"{k} {v}/{len(runs)}" for k, v in kinds.items())
            same = m == base  # the default recipe itself, or a setting equal to it (width 64,64; depth 2)
            lines.append(f"| {dim} | {label} | {outcomes} | {spread(m['epochs to 100%'], '{:g}')} "
                         f"| {spread(m['epochs to 1e-3'], '{:g}')} | {spread(m['final loss'], '{:.2e}', 'diverged')} "
                         f"| {'(the default recipe)' if same else verdict({k: (m[k], base[k]) for k in m})} |")
    return "\n".join(lines)


def study_figures(results: Study, out: Path) -> list[Path]:
    paths = []
    for dim, variants in results.items():
        fig, (ax,) = figures.panels(1, size=(6, 4))
        for i, (label, runs) in enumerate(variants):
            curves = [figures.finite(r.curve("train_loss")) for r in runs]
            for c in curves:
                ax.plot(range(1, len(c) + 1), c, color=f"C{i}", alpha=0.2, lw=0.6)
            length = max(len(c) for c in curves)
            med = [_nanmedian([c[j] for c in curves if j < len(c)]) for j in range(length)]
            ax.plot(range(1, length + 1), med, color=f"C{i}", lw=1.8, label=label)
        ax.set_yscale("log")
        ax.axhline(1e-3, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="epoch", ylabel="train loss (log)", title=f"Overfit study: {dim} ({len(runs)} seeds faint, "
               "median bold)")
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


def _nanmedian(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/overfit")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--seeds", type=int, default=5)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_study(out, args.epochs, args.seeds)
    label, default_runs = results["learning rate (Adam)"][2]
    assert label == "lr 0.01", "the default recipe is the third learning rate"
    text = (f"Overfit study: one change at a time from the default recipe, seeds 0–{args.seeds - 1}; cells are "
            "median [min–max] over the seeds (\"not reached\": not within the budget). The last column compares "
            "each setting's median with the default recipe's [min–max]. Regenerate with `make overfit-study`.\n\n"
            + table(results, args.epochs, default_runs) + "\n")
    (out / "study.md").write_text(text)
    study_figures(results, out)
    default_run = default_runs[0]
    boundary_figure(out / "study-runs" / "checkpoints" / default_run.name / "last.pt", out / "boundary.png")
    curves_figure(default_run, out / "curves.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
