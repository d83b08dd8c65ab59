"""make digits: the CNN recipe on scikit-learn's 8x8 digits over 5 seeds, the same at bf16 and fp16, and the Part-2
overfit check on 200 real training images.

    python -m launch.digits [--out reports/digits] [--seeds 5] [--precisions fp32,bf16,fp16] [--compile-seeds 0]

Writes reports/digits/digits.md: per seed and per precision, the epochs and seconds to 97% validation accuracy and
the final accuracy, then median [min-max] over the seeds. Exit code 1 if any fp32 seed ends below 97% validation
accuracy or the overfit check misses 100% training accuracy: the recipe's claim is checked, not assumed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from launch.runner import RunRecord, run, run_many

TARGET = 0.97
# The documented recipe: two conv blocks of 16 and 32 channels with BatchNorm, Adam 3e-3, batch 32, 10 epochs.
RECIPE = ["--dataset", "digits", "--model", "cnn", "--hidden", "16,32", "--batchnorm", "--optimizer", "adam",
          "--lr", "3e-3", "--batch-size", "32", "--epochs", "10"]
# Part 2 on real data: the first 200 training images (stratified split, seeded order), no validation target.
# Adam 1e-2 rather than the recipe's 3e-3: at 3e-3 the loss is still above 1e-3 after 100 epochs (measured).
OVERFIT = ["--dataset", "digits", "--model", "cnn", "--hidden", "16,32", "--optimizer", "adam", "--lr", "1e-2",
           "--batch-size", "20", "--epochs", "100", "--limit-samples", "200"]
QUIET = ["--no-tensorboard", "--print-every", "1000", "--checkpoint-every-epochs", "1000", "--threads", "1"]


def epochs_to(r: RunRecord, target: float) -> tuple[int | None, float | None]:
    """(first epoch whose validation accuracy is >= target, training seconds up to the end of that epoch)."""
    seconds = 0.0
    for row in r.metrics:
        seconds += row["epoch_seconds"]
        if row["val_acc"] >= target:
            return row["epoch"], seconds
    return None, None


def spread(values: list[float], fmt: str) -> str:
    """median [min-max], the form every figure of the write-ups takes."""
    if not values:
        return "—"
    return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}–{format(max(values), fmt)}]"


def _row(label: str, seed: int, r: RunRecord) -> dict:
    if r.returncode != 0:
        raise SystemExit(f"launch.digits: {label} seed {seed} failed (exit {r.returncode}): {r.stderr.strip()}")
    epoch, seconds = epochs_to(r, TARGET)
    return {"label": label, "seed": seed, "epochs_to_97": epoch, "seconds_to_97": seconds,
            "val_acc": r.summary["final"]["val_acc"], "train_acc": r.summary["final"]["train_acc"],
            "wall": r.summary["wall_seconds"], "train_sps": r.summary["train_samples_per_sec"],
            "skipped": r.summary.get("scaler_skipped_steps", 0), "weights": r.weights()}


def recipe_runs(out: Path, label: str, flags: list[str], seeds: int, world: int = 1) -> list[dict]:
    """The recipe with `flags` on seeds 0..seeds-1; at world 2 in one torchrun job, 16 per rank (the same global
    batch of 32 as world 1)."""
    specs = [(RECIPE + QUIET + flags + ["--seed", str(seed)], f"{label}-seed{seed}") for seed in range(seeds)]
    if world == 1:
        records = [run(args, out, name, overwrite=True) for args, name in specs]
    else:
        records = run_many([(args + ["--batch-size", "16"], name) for args, name in specs], out, world=world)
    return [_row(label, seed, r) for seed, r in enumerate(records)]


def weight_difference(a: dict, b: dict) -> float:
    """Largest absolute difference between two runs' final weights (BatchNorm's running statistics included)."""
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def table(rows: list[dict]) -> list[str]:
    lines = ["| run | seed | epochs to 97% val | train s to 97% | final val acc | final train acc | wall s "
             "| train samples/s | fp16 steps skipped |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        seconds = "—" if r["seconds_to_97"] is None else f"{r['seconds_to_97']:.2f}"
        lines.append(f"| {r['label']} | {r['seed']} | {r['epochs_to_97'] or '—'} | {seconds} | "
                     f"{r['val_acc']:.2%} | {r['train_acc']:.2%} | {r['wall']:.1f} | {r['train_sps']:,.0f} | "
                     f"{r['skipped']} |")
    return lines


def summary_lines(groups: dict[str, list[dict]]) -> list[str]:
    lines = ["| run | seeds reaching 97% | epochs to 97% | train s to 97% | final val acc (%) | wall s "
             "| train samples/s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, rows in groups.items():
        reached = [r for r in rows if r["epochs_to_97"] is not None]
        lines.append(f"| {label} | {len(reached)}/{len(rows)} | {spread([r['epochs_to_97'] for r in reached], 'g')} | "
                     f"{spread([r['seconds_to_97'] for r in reached], '.2f')} | "
                     f"{spread([100 * r['val_acc'] for r in rows], '.2f')} | {spread([r['wall'] for r in rows], '.1f')}"
                     f" | {spread([r['train_sps'] for r in rows], ',.0f')} |")
    return lines


def world2_lines(groups: dict[str, list[dict]], world2: dict[str, list[dict]]) -> list[str]:
    """BatchNorm at world 2 against world 1 at the same global batch, per seed, with the no-BatchNorm control."""
    if not world2:
        return []
    single, double = groups["fp32"], world2["bn"]
    diffs = [weight_difference(a["weights"], b["weights"]) for a, b in zip(single, double, strict=True)]
    plain = world2["plain"]
    control = weight_difference(plain[0]["weights"], plain[1]["weights"])
    return [
        "## BatchNorm at world 2 (DDP, gloo, 16 per rank) against world 1 (32), same global batch", "",
        "`torchrun --nproc_per_node=2 train.py " + " ".join(RECIPE).replace("--batch-size 32", "--batch-size 16")
        + " --seed S`", "",
        "| | world 1 | world 2 |", "|---|---:|---:|",
        f"| final val acc (%) | {spread([100 * r['val_acc'] for r in single], '.2f')} | "
        f"{spread([100 * r['val_acc'] for r in double], '.2f')} |",
        f"| epochs to 97% | {spread([r['epochs_to_97'] for r in single if r['epochs_to_97']], 'g')} | "
        f"{spread([r['epochs_to_97'] for r in double if r['epochs_to_97']], 'g')} |", "",
        f"- largest final-weight difference, world 2 vs world 1, same seed: {spread(diffs, '.3g')}",
        f"- the same without BatchNorm (seed 0, the control): {control:.3g}",
        "",
        "With BatchNorm the two are different computations: in train mode each BatchNorm normalises with the mean "
        "and variance of the batch it sees, which is a rank's 16 samples at world 2 and all 32 at world 1. DDP "
        "averages the gradients exactly, but they are gradients of differently normalised activations, so the "
        "weights part from the first step (without BatchNorm they agree to float rounding). torch.nn.SyncBatchNorm "
        "would use the global batch's statistics, but torch 2.13 refuses it on CPU modules ('SyncBatchNorm layers "
        "only work with GPU modules'), so `--sync-batchnorm` is GPU-only and refused on CPU. Whether the accuracy "
        "differs is the comparison of the two columns against their spread over seeds.",
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/digits")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--precisions", default="fp32,bf16,fp16", help="comma-separated; fp32 first is the reference")
    p.add_argument("--no-world2", dest="world2", action="store_false", help="skip the BatchNorm world-2 comparison "
                   "(one torchrun job of --seeds runs)")
    p.add_argument("--compile-seeds", type=int, default=0, help="also run the fp32 recipe with --compile on this "
                   "many seeds (each compiles from cold: tens of seconds on a small CPU)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_out = out / "digits-runs"  # ignored by git (/reports/**/*-runs/): the tables are what is kept

    groups = {name: recipe_runs(runs_out, name, ["--precision", name], args.seeds)
              for name in args.precisions.split(",")}
    if args.compile_seeds:
        groups["fp32 --compile"] = recipe_runs(runs_out, "fp32-compile", ["--compile"], args.compile_seeds)
    world2 = {}
    if args.world2 and "fp32" in groups:
        # BatchNorm at world 2: each rank normalises its own 16 samples; world 1 normalises all 32. The control
        # pair without BatchNorm shows what float rounding alone does to the same comparison.
        world2["bn"] = recipe_runs(runs_out, "fp32-world2", ["--precision", "fp32"], args.seeds, world=2)
        no_bn = [a for a in RECIPE if a != "--batchnorm"]
        plain = [run(no_bn + QUIET + ["--seed", "0"], runs_out, "nobn-world1-seed0", overwrite=True)]
        plain += run_many([(no_bn + QUIET + ["--seed", "0", "--batch-size", "16"], "nobn-world2-seed0")], runs_out,
                          world=2)
        world2["plain"] = [_row(label, 0, r) for label, r in zip(("no BN, world 1", "no BN, world 2"), plain,
                                                                  strict=True)]

    overfit = run(OVERFIT + QUIET + ["--seed", "0"], runs_out, "overfit200", overwrite=True)
    s = overfit.summary
    overfit_ok = overfit.returncode == 0 and s["epochs_to_100_train_acc"] is not None
    recipe_ok = all(r["val_acc"] >= TARGET for r in groups.get("fp32", []))

    text = [
        "# Digits + CNN (issue 16)", "",
        "Regenerate with `make digits` (`python -m launch.digits`); every figure below comes from that run. "
        "Data: scikit-learn's 8x8 digits, 1,438 train / 359 validation images, a stratified split from "
        "`--data-seed 0`. One CPU thread per run.", "",
        "Recipe: `python train.py " + " ".join(RECIPE) + " --seed S` (S = 0..." + str(args.seeds - 1) + "), at each "
        "`--precision`.", "",
        "## Median [min–max] over seeds", "", *summary_lines(groups), "",
        "An effect is a difference larger than the spread between seeds; inside it, not distinguishable.", "",
        "## Per seed", "", *table([r for rows in groups.values() for r in rows]), "",
        *world2_lines(groups, world2), "",
        "## Part 2 on real data: overfit 200 training images", "",
        "`python train.py " + " ".join(OVERFIT) + " --seed 0`", "",
        f"- 100% train accuracy first reached at epoch {s['epochs_to_100_train_acc']}, step "
        f"{s['steps_to_100_train_acc']}" if s["epochs_to_100_train_acc"] else "- 100% train accuracy: not reached",
        f"- final train loss {s['final']['train_loss']:.2e}, train accuracy {s['final']['train_acc']:.2%}; "
        f"validation accuracy on the 359 held-out images {s['final']['val_acc']:.2%} (200 images generalise less "
        "than 1,438)",
        f"- train loss <= {s['target_loss']:g}: " + (f"epoch {s['epochs_to_target_loss']}"
                                                     if s["epochs_to_target_loss"] else "not reached"),
        "",
        f"Checks: every fp32 seed ends at >= {TARGET:.0%} validation accuracy: {'yes' if recipe_ok else 'NO'}; "
        f"the overfit check reaches 100% train accuracy: {'yes' if overfit_ok else 'NO'}.",
    ]
    (out / "digits.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 0 if recipe_ok and overfit_ok else 1


if __name__ == "__main__":
    sys.exit(main())
