"""Part 4 on seeds: data size at fixed epochs and at fixed steps, steps to the target against the batch size
(read against Shallue et al. 2019), and linear scaling with gradual warmup (Goyal et al. 2017) where it broke.

    python -m launch.scale_study [--out reports/scale-study] [--seeds 5]

The recipe of make scale (launch/scale.py: the `rule` dataset, 32-d inputs, 4 classes, MLP 64-64, SGD with
momentum 0.9, lr 0.01 x batch / 16). Groups, each on seeds 0..N-1:
  data-epochs  dataset size 1k..100k at batch 128 for 8 epochs (bigger sets also get more steps)
  data-steps   the same sizes for about STEPS_FIXED steps each (the epochs adjusted to the size)
  batch        global batch 16..4096 with the scaled lr, a budget long enough for every batch to reach the
               target: optimizer steps to an epoch's train loss <= 0.3
  warmup       the batches where linear scaling broke, again with a linear warmup over WARMUP_EPOCHS epochs
Writes study.md (tables), runs.json (every run) and two figures.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from launch import figures
from launch.runner import run_many
from launch.scale import BASE_BATCH, BASE_LR, RECIPE, TARGET_LOSS
from launch.stats import spread, verdict

SIZES = (1000, 3000, 10_000, 30_000, 100_000)
DATA_BATCH, DATA_EPOCHS, STEPS_FIXED = 128, 8, 1250
BATCH_SAMPLES = 20_000  # 16,000 training samples
BATCHES = (16, 64, 256, 1024, 4096)
BATCH_EPOCHS = {16: 10, 64: 10, 256: 20, 1024: 30, 4096: 40}  # enough for the target at every batch
WARMUP_BATCHES, WARMUP_EPOCHS = (1024, 4096), 5  # Goyal et al. warm up over 5 epochs


def n_train(n: int) -> int:
    return n - max(1, round(n * 0.2))


def plan(seeds: range) -> list[tuple[str, dict, list[str]]]:
    """(group, parameters, train.py flags), one per run."""
    specs = []
    for n in SIZES:
        steps_per_epoch = math.ceil(n_train(n) / DATA_BATCH)
        fixed_steps = max(1, round(STEPS_FIXED / steps_per_epoch))
        for group, epochs in (("data-epochs", DATA_EPOCHS), ("data-steps", fixed_steps)):
            for s in seeds:
                specs.append((group, {"n": n, "epochs": epochs, "steps": epochs * steps_per_epoch, "seed": s},
                              ["--n-samples", str(n), "--global-batch-size", str(DATA_BATCH),
                               "--lr", f"{BASE_LR * DATA_BATCH / BASE_BATCH:g}", "--epochs", str(epochs)]))
    for b in BATCHES:
        steps_per_epoch = math.ceil(n_train(BATCH_SAMPLES) / b)
        variants = [("batch", 0)] + ([("warmup", WARMUP_EPOCHS * steps_per_epoch)] if b in WARMUP_BATCHES else [])
        for group, warmup in variants:
            for s in seeds:
                specs.append((group, {"batch": b, "warmup": warmup, "seed": s},
                              ["--n-samples", str(BATCH_SAMPLES), "--global-batch-size", str(b),
                               "--lr", f"{BASE_LR * b / BASE_BATCH:g}", "--epochs", str(BATCH_EPOCHS[b]),
                               "--warmup-steps", str(warmup)]))
    return specs


def _name(group: str, params: dict) -> str:
    return group + "-" + "-".join(f"{k}{v}" for k, v in params.items())


def tables(rows: list[dict], n_seeds: int) -> str:
    def pick(group: str, **match) -> list[dict]:
        return [r for r in rows if r["group"] == group and all(r[k] == v for k, v in match.items())]

    out = [f"Part 4 on seeds 0–{n_seeds - 1}: cells are median [min–max]. Recipe of `make scale` (rule dataset, "
           "32-d, 4 classes, MLP 64-64, SGD momentum 0.9, lr 0.01 × batch / 16). Regenerate with `make report` "
           "(`python -m launch.scale_study`).", "",
           f"### Dataset size at fixed epochs ({DATA_EPOCHS}) and at fixed steps (about {STEPS_FIXED}); batch "
           f"{DATA_BATCH}", "",
           "| samples (train) | budget | steps | final train loss | final val loss | val − train | val acc |",
           "|---:|---|---:|---:|---:|---:|---:|"]
    for n in SIZES:
        for group, label in (("data-epochs", "fixed epochs"), ("data-steps", "fixed steps")):
            g = pick(group, n=n)
            gap = [r["val_loss"] - r["train_loss"] for r in g if r["val_loss"] is not None and r["train_loss"]]
            out.append(f"| {n:,} ({n_train(n):,}) | {label} ({g[0]['epochs']} epochs) | {g[0]['steps']:,} "
                       f"| {spread([r['train_loss'] for r in g])} | {spread([r['val_loss'] for r in g])} "
                       f"| {spread(gap)} | {spread([r['val_acc'] for r in g])} |")
    base16 = [r["steps_to_target"] for r in pick("batch", batch=BATCHES[0])]
    ideal = statistics.median([v for v in base16 if v is not None]) if any(v is not None for v in base16) else None
    out += ["", f"### Steps to an epoch's train loss ≤ {TARGET_LOSS} against the global batch "
            f"({n_train(BATCH_SAMPLES):,} training samples, lr scaled linearly)", "",
            "| global batch | lr | warmup steps | epochs budget | diverged | final train loss | steps to target "
            f"| perfect scaling from batch {BATCHES[0]} | measured / perfect | warmup outside the no-warmup spread? |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for b in BATCHES:
        for group in ("batch", "warmup"):
            g = pick(group, batch=b)
            if not g:
                continue
            steps = [r["steps_to_target"] for r in g]
            perfect = ideal * BATCHES[0] / b if ideal else None
            med = statistics.median([math.inf if v is None else v for v in steps])
            ratio = "—" if perfect is None or math.isinf(med) else f"{med / perfect:.2g}"
            against = "—"
            if group == "warmup":
                base = pick("batch", batch=b)
                against = verdict({"steps to target": (steps, [r["steps_to_target"] for r in base]),
                                   "final loss": ([r["train_loss"] for r in g], [r["train_loss"] for r in base])})
            out.append(f"| {b} | {BASE_LR * b / BASE_BATCH:g} | {g[0]['warmup']} | {BATCH_EPOCHS[b]} "
                       f"| {sum(r['diverged'] for r in g)}/{len(g)} | {spread([r['train_loss'] for r in g])} "
                       f"| {spread(steps, '{:g}')} | {'—' if perfect is None else f'{perfect:.3g}'} | {ratio} "
                       f"| {against} |")
    return "\n".join(out) + "\n"


def plots(rows: list[dict], out: Path) -> None:
    fig, axes = figures.panels(2)
    for group, style in (("batch", "o-"), ("warmup", "s--")):
        g = [r for r in rows if r["group"] == group]
        bs = sorted({r["batch"] for r in g})
        for b in bs:
            for r in (r for r in g if r["batch"] == b and r["steps_to_target"]):
                axes[0].plot(b, r["steps_to_target"], "." if group == "batch" else "x", color="0.6")
        med = [statistics.median([math.inf if r["steps_to_target"] is None else r["steps_to_target"]
                                  for r in g if r["batch"] == b]) for b in bs]
        axes[0].plot(bs, [m if math.isfinite(m) else math.nan for m in med], style,
                     label="linear lr scaling" + (" + warmup" if group == "warmup" else ""))
    base = [r["steps_to_target"] for r in rows if r["group"] == "batch" and r["batch"] == BATCHES[0]]
    if all(base):
        ideal = statistics.median(base)
        axes[0].plot(BATCHES, [ideal * BATCHES[0] / b for b in BATCHES], "k:", lw=0.8, label="perfect scaling")
    axes[0].set(xscale="log", yscale="log", xlabel="global batch", ylabel=f"steps to train loss ≤ {TARGET_LOSS}")
    axes[0].legend(fontsize=7)
    for group, style in (("data-epochs", "o-"), ("data-steps", "s--")):
        g = [r for r in rows if r["group"] == group]
        axes[1].plot(SIZES, [statistics.median([r["val_loss"] - r["train_loss"] for r in g if r["n"] == n])
                             for n in SIZES], style, label=group.replace("data-", "fixed "))
    axes[1].set(xscale="log", xlabel="samples", ylabel="val loss − train loss (median)")
    axes[1].legend(fontsize=7)
    figures.save(fig, out / "scaling.png", "Steps to target vs batch (Shallue et al. 2019); generalisation gap vs "
                 "data size", "python -m launch.scale_study")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/scale-study")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--replot", action="store_true", help="redraw the tables and figures from <out>/runs.json")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        rows = json.loads((out / "runs.json").read_text())
        (out / "study.md").write_text(tables(rows, len({r["seed"] for r in rows})))
        plots(rows, out)
        return 0
    specs = plan(range(args.seeds))
    records = run_many([(RECIPE + flags + ["--seed", str(params["seed"]), "--threads", "1", "--no-tensorboard"],
                         _name(group, params)) for group, params, flags in specs], out / "scale-study-runs", 1)
    rows = []
    for (group, params, _flags), r in zip(specs, records, strict=True):
        if r.returncode not in (0, 3) or not r.summary:
            print(f"scale_study: {r.name} failed (exit {r.returncode}): {r.stderr[-500:]}", file=sys.stderr)
            return 1
        f = r.summary.get("final") or {}
        bad = r.summary.get("diverged")
        rows.append({"group": group, **params, "diverged": bool(bad), "steps_to_target": r.summary.get(
            "steps_to_target_loss"), **{k: None if bad else f.get(k) for k in ("train_loss", "val_loss", "val_acc")}})
    text = tables(rows, args.seeds)
    (out / "study.md").write_text(text)
    (out / "runs.json").write_text(json.dumps(rows, indent=0) + "\n")
    plots(rows, out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
