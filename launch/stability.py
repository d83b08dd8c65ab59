"""The stability edge: where plain SGD starts to diverge, against the curvature at initialisation.

    python -m launch.stability [--out reports/stability] [--seeds 5]

Gradient descent on a quadratic with largest Hessian eigenvalue lambda_max diverges once lr * lambda_max > 2
(heavy-ball momentum beta: once lr * lambda_max > 2 (1 + beta)). This study measures lambda_max of the mean
training loss at initialisation (power iteration on Hessian-vector products, spine/instruments/sharpness.py),
on the full training set and on batches of 32, for every seed; then sweeps the learning rate of the break
catalogue's problem (launch/break_all.py's BASE without dropout, so the loss trained is the deterministic one
whose Hessian is measured) and records, per seed, whether the run diverged (non-finite, or ended above 3x its
initial loss: the harness's `diverged`). Four series: SGD on the full batch, SGD at batch 32, SGD with momentum
0.9 at batch 32 (the `huge-lr` configuration), and Adam at batch 32, whose edge is not set by lambda_max alone.

Writes edge.md (the table), edge.json (every run's outcome and every seed's lambda_max) and edge.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

from data import build_dataset
from launch import figures
from launch.break_all import BASE
from launch.runner import run
from launch.stats import sig, spread
from models import build_model
from spine.config import parse_config
from spine.instruments.sharpness import top_hessian_eigenvalue

PROBLEM = BASE + ["--dropout", "0", "--momentum", "0"]
SGD_LRS = [2 ** (k / 2) for k in range(-4, 13)]  # 0.25 .. 64, a factor sqrt(2) apart
ADAM_LRS = [0.01 * 2 ** k for k in range(0, 11)]  # 0.01 .. 10.24
# name -> (flags beyond PROBLEM, epochs, learning rates, momentum for the 2(1+beta)/lambda prediction or None)
SERIES: dict[str, tuple[list[str], int, list[float], float | None]] = {
    "SGD, full batch": (["--batch-size", "324"], 100, SGD_LRS, 0.0),
    "SGD, batch 32": ([], 10, SGD_LRS, 0.0),
    "SGD + momentum 0.9, batch 32": (["--momentum", "0.9"], 10, SGD_LRS, 0.9),
    "Adam, batch 32": (["--optimizer", "adam"], 10, ADAM_LRS, None),
}
BATCHES_MEASURED = 4  # random batches of 32 whose lambda_max is averaged
END_LRS = (SGD_LRS[2], SGD_LRS[5], SGD_LRS[7])  # 0.5 (below 2/lambda_max at init), 1.41 and 2.83 (above it)


def sharpness_at_init(seed: int) -> tuple[float, float]:
    """(lambda_max of the full training loss, mean lambda_max over random batches of 32), at seed's initial weights,
    built exactly as train.py builds them."""
    cfg = parse_config(PROBLEM + ["--seed", str(seed), "--no-tensorboard"], world_size=1)
    data = build_dataset(cfg.dataset, cfg.n_samples, cfg.val_fraction, cfg.noise, cfg.dim, cfg.classes,
                         cfg.data_seed, cfg.order)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.in_dim, data.num_classes, cfg.hidden, cfg.activation, cfg.dropout,
                        cfg.batchnorm)
    loss = nn.CrossEntropyLoss()
    full = top_hessian_eigenvalue(model, loss, data.train_x, data.train_y, iters=200)
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(BATCHES_MEASURED):
        idx = torch.randperm(len(data.train_x), generator=g)[:32]
        batch.append(top_hessian_eigenvalue(model, loss, data.train_x[idx], data.train_y[idx], iters=200))
    return full, statistics.mean(batch)


def sharpness_of(checkpoint: Path) -> float:
    """lambda_max of the full training loss at a run's saved weights (where a run above 2/lambda_init settled)."""
    from spine.checkpoint import load_for_eval

    model, _cfg, data, _state = load_for_eval(checkpoint)
    return top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), data.train_x, data.train_y, iters=200)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).replace("--", "-").strip("-")


def sweep(out: Path, seeds: range) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {}
    for name, (flags, epochs, lrs, _beta) in SERIES.items():
        results[name] = []
        for lr in lrs:
            for seed in seeds:
                args = PROBLEM + flags + ["--lr", f"{lr:g}", "--epochs", str(epochs), "--seed", str(seed),
                                          "--log-every", "10"]
                r = run(args, out / "stability-runs", f"{_slug(name)}-lr{lr:g}-s{seed}", overwrite=True)
                final = (r.summary.get("final") or {}).get("train_loss")
                diverged = bool(r.summary.get("diverged")) or "diverged" in r.summary.get("symptoms", [])
                results[name].append({"lr": lr, "seed": seed, "returncode": r.returncode, "diverged": diverged,
                                      "non_finite": bool(r.summary.get("diverged")),
                                      "initial_loss": sig(r.summary.get("initial_loss")),
                                      "final_train_loss": None if r.summary.get("diverged") else sig(final)})
                if name == "SGD, full batch" and lr in END_LRS and not diverged and r.returncode == 0:
                    results[name][-1]["lambda_max_end"] = sig(sharpness_of(r.ckpt_dir / "last.pt"))
            print(f"{name:30s} lr {lr:8.4g}: diverged {sum(x['diverged'] for x in results[name] if x['lr'] == lr)}"
                  f"/{len(seeds)}", flush=True)
    return results


def edges(rows: list[dict], n_seeds: int) -> tuple[float | None, float | None]:
    """(largest lr where no seed diverged, below every lr where a seed did; smallest lr where every seed diverged)."""
    by_lr: dict[float, int] = {}
    for x in rows:
        by_lr[x["lr"]] = by_lr.get(x["lr"], 0) + x["diverged"]
    lrs = sorted(by_lr)
    first_any = next((lr for lr in lrs if by_lr[lr] > 0), None)
    stable = max((lr for lr in lrs if first_any is None or lr < first_any), default=None)
    all_div = next((lr for lr in lrs if by_lr[lr] == n_seeds), None)
    return stable, all_div


def _median_loss(rows: list[dict], lr: float) -> str:
    return spread([x["final_train_loss"] for x in rows if x["lr"] == lr], none="non-finite").split(" [")[0]


def report(results: dict[str, list[dict]], sharp: list[tuple[float, float]], seeds: range, out: Path) -> str:
    full = [s[0] for s in sharp]
    batch = [s[1] for s in sharp]
    lam = statistics.median(full)
    lines = ["Stability edge. Problem: `make break`'s configuration without dropout (moons, 324 training points, "
             f"MLP 64-64); seeds 0–{len(seeds) - 1}. Regenerate with `make report` (`python -m launch.stability`).",
             "", "| curvature at initialisation | median [min–max] over seeds |", "|---|---:|",
             f"| λmax of the full training loss | {spread(full)} |",
             f"| λmax of a batch of 32 (mean of {BATCHES_MEASURED} batches) | {spread(batch)} |",
             f"| 2/λmax (full loss): predicted SGD edge | {spread([2 / v for v in full])} |",
             f"| 2·1.9/λmax: predicted edge with momentum 0.9 | {spread([3.8 / v for v in full])} |", "",
             "| series | steps | largest lr with no seed diverged | smallest lr with every seed diverged "
             "| prediction from λmax at init | measured edge / prediction |", "|---|---:|---:|---:|---:|---:|"]
    for name, (flags, epochs, _lrs, beta) in SERIES.items():
        stable, all_div = edges(results[name], len(seeds))
        steps = epochs * (1 if "324" in flags else 11)
        pred = None if beta is None else 2 * (1 + beta) / lam
        ratio = "—" if pred is None or stable is None else f"{stable / pred:.2g}–{(all_div or stable) / pred:.2g}"
        lines.append(f"| {name} | {steps} | {'—' if stable is None else f'{stable:.3g}'} "
                     f"| {'none diverged' if all_div is None else f'{all_div:.3g}'} "
                     f"| {'— (not set by λmax)' if pred is None else f'{pred:.3g}'} | {ratio} |")
    lines += ["", f"Per learning rate: seeds diverged (of {len(seeds)}; non-finite, or a final train loss above 3x "
              "the initial: the harness's `diverged`), and the median final train loss.", ""]
    for name, (_flags, _epochs, lrs, _beta) in SERIES.items():
        rows = results[name]
        lines += [f"| {name}: lr | " + " | ".join(f"{lr:.3g}" for lr in lrs) + " |", "|---|" + "---:|" * len(lrs),
                  "| diverged | " + " | ".join(str(sum(x["diverged"] for x in rows if x["lr"] == lr)) for lr in lrs)
                  + " |",
                  "| final train loss | " + " | ".join(_median_loss(rows, lr) for lr in lrs) + " |", ""]
    settled = [x for x in results["SGD, full batch"] if "lambda_max_end" in x]
    if settled:
        lines += ["Full-batch SGD runs that did not diverge, below and above 2/λmax(init): λmax of their final "
                  "weights against 2/lr, the largest curvature that lr tolerates.", "",
                  "| lr | 2/lr | λmax at the end, median [min–max] | λmax at the end × lr |", "|---:|---:|---:|---:|"]
        for lr in sorted({x["lr"] for x in settled}):
            ends = [x["lambda_max_end"] for x in settled if x["lr"] == lr]
            lines.append(f"| {lr:.3g} | {2 / lr:.3g} | {spread(ends)} | {spread([v * lr for v in ends])} |")
    text = "\n".join(lines) + "\n"
    _figure(results, lam, out / "edge.png", len(seeds))
    return text


def _figure(results: dict[str, list[dict]], lam: float, path: Path, n: int) -> None:
    fig, axes = figures.panels(2)
    for name in SERIES:
        ax = axes[1] if name.startswith("Adam") else axes[0]
        lrs = sorted({x["lr"] for x in results[name]})
        frac = [sum(x["diverged"] for x in results[name] if x["lr"] == lr) / n for lr in lrs]
        ax.plot(lrs, frac, marker="o", label=name)
    axes[0].axvline(2 / lam, color="k", ls="--", lw=0.8, label="2/λmax at init")
    axes[0].axvline(3.8 / lam, color="k", ls=":", lw=0.8, label="2(1+0.9)/λmax")
    for ax in axes:
        ax.set(xscale="log", xlabel="learning rate (log)", ylabel="fraction of seeds diverged", ylim=(-0.05, 1.05))
        ax.legend(fontsize=7)
    figures.save(fig, path, f"Where training diverges, {n} seeds per point", "python -m launch.stability")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/stability")
    p.add_argument("--seeds", type=int, default=5)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = range(args.seeds)
    sharp = [sharpness_at_init(s) for s in seeds]
    print("lambda_max at init (full, batch-32 mean):", sharp, flush=True)
    results = sweep(out, seeds)
    text = report(results, sharp, seeds, out)
    (out / "edge.md").write_text(text)
    (out / "edge.json").write_text(json.dumps({"lambda_max_full": [s[0] for s in sharp],
                                               "lambda_max_batch32": [s[1] for s in sharp],
                                               "runs": results}, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
