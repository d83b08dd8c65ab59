"""make break: a baseline and every deliberate mistake of spine/breaks.py, on several seeds, against its baseline.

    python -m launch.break_all [--out reports/break] [--seeds 5] [--only NAME ...] [--epochs 40]

Every row runs on seeds 0..N-1; every number is reported as median [min–max] over them, and the column "outside
baseline spread?" says whether the mistake's median left the [min–max] of its own baseline (same seeds, same
flags but the mistake): inside is "not distinguishable from noise". World-1 runs go in this process; the
distributed ones (and a world-2 baseline) run in one torchrun job of two ranks. Every run logs every step
(--log-every 1), so the per-step loss and grad norm exist for every step.

Writes break.md (the table), bn.md (BatchNorm: validation in train mode at two eval batch sizes), steps.json (the
per-step loss and grad norm of the first STEPS_KEPT steps of every seed: the numbers experiments.md cites), one
per-step figure per mistake (<name>.png: every seed faint, the median bold, against its baseline's) and
results.json (each seed's outcome). A diverged run is an expected outcome here, not a failure: the exit code is
non-zero only if a run fails for another reason or a mistake does not show the symptoms expected of it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from launch import figures
from launch.runner import RunRecord, run_many
from launch.stats import sig, spread, verdict
from spine.breaks import BREAKS

# Dropout makes train/eval mode matter; SGD makes the loss scale and the lr visible (Adam normalises both
# away); 405 samples give 81 validation samples, an odd count, so DistributedSampler must pad at world 2;
# the training set is stored sorted by class so that a missing shuffle shows.
BASE = ["--dataset", "moons", "--n-samples", "405", "--noise", "0.1", "--dropout", "0.1",
        "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--epochs", "40", "--order", "sorted",
        "--checkpoint-every-epochs", "1000", "--print-every", "1000", "--log-every", "1", "--no-tensorboard"]
WORLD2 = ["--global-batch-size", "32"]
# BatchNorm: batch 64 and 320 training samples (5 full steps, no short last batch), no dropout. At batch 32 the
# batch statistics are noisy enough that a correct run's train-mode loss plateaus (tried by hand on 5 seeds: about
# 98% train-mode accuracy, 100% in eval mode on the same weights), which the detector flags; at 64 it is clean.
BATCHNORM = ["--batchnorm", "--dropout", "0", "--batch-size", "64", "--n-samples", "400"]
STEPS_KEPT = 160  # per-step values kept in steps.json: the first ~15 epochs, where every cited effect happens
EVAL_BATCHES = (80, 16)  # train-mode validation of BatchNorm weights at these eval batch sizes (80 = all at once)


@dataclass(frozen=True)
class Row:
    world: int
    flags: list[str]
    expected: frozenset[str] | None  # symptoms the harness must report; None = not checked (a measurement row)
    baseline: str  # the row this one is compared with ("" for a baseline)


def experiments() -> dict[str, Row]:
    """name -> Row, in the table's order."""
    table: dict[str, Row] = {}
    for world in (1, 2):
        base = "baseline" if world == 1 else "baseline, world 2"
        common = [] if world == 1 else WORLD2
        table[base] = Row(world, common, frozenset(), "")
        for m in (m for m in BREAKS.values() if m.ranks == world):
            flags = common + ["--break", m.name]
            table[m.name] = Row(world, flags, m.symptoms, base)
            for v in m.variants:
                table[f"{m.name}, {v.label}"] = Row(world, flags + list(v.flags), v.symptoms, base)
    # The same mistakes under other settings, each beside a baseline with the same settings.
    for label, flags, mistakes in (
        # lr 0.5 without momentum: the same long-run step as lr 0.05 with momentum 0.9 (lr / (1 - momentum)).
        ("SGD without momentum, lr 0.5", ["--momentum", "0", "--lr", "0.5"], {"no-zero-grad": None}),
        ("Adam", ["--optimizer", "adam", "--lr", "0.01", "--momentum", "0"], {"no-zero-grad": None}),
        ("BatchNorm", BATCHNORM, {"no-train-mode": frozenset({"trained-in-eval-mode"}),
                                  "no-eval-mode": frozenset({"validated-in-train-mode", "val-mismatch"})}),
        ("no dropout", ["--dropout", "0"], {"no-eval-mode": frozenset({"validated-in-train-mode"})}),
    ):
        base = f"baseline, {label}"
        table[base] = Row(1, flags, frozenset(), "")
        for mistake, expected in mistakes.items():
            table[f"{mistake}, {label}"] = Row(1, flags + ["--break", mistake], expected, base)
    table["no-eval-mode, BatchNorm, eval batch 16"] = Row(
        1, BATCHNORM + ["--break", "no-eval-mode", "--eval-batch-size", "16"],
        frozenset({"validated-in-train-mode", "val-mismatch"}), "baseline, BatchNorm")
    # sum-loss at world 2: DDP averages per-rank sums, so the step scales with the per-rank batch (16 here).
    table["sum-loss, world 2"] = Row(2, WORLD2 + ["--break", "sum-loss"], None, "baseline, world 2")
    return table


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).replace("--", "-").strip("-")


def _final(r: RunRecord, key: str) -> float | None:
    f = r.summary.get("final") or {}
    v = f.get(key)
    return None if r.summary.get("diverged") or v is None or not math.isfinite(v) else v


def metrics_of(runs: list[RunRecord]) -> dict[str, list]:
    """The compared quantities, one value per seed (None = diverged / never reached)."""
    return {"epochs to 100%": [r.summary.get("epochs_to_100_train_acc") for r in runs],
            "train loss": [_final(r, "train_loss") for r in runs],
            "val loss": [_final(r, "val_loss") for r in runs]}


# Training-dynamics symptoms that an outright divergence stands in for: a seed that diverged shows the failure in
# its strongest form (sum-loss oscillates on some seeds and diverges on others).
SUBSUMED_BY_DIVERGENCE = frozenset({"oscillation", "plateau", "loss-spike"})


def shows(expected: frozenset[str], got: set[str]) -> bool:
    """Whether a seed shows the expected symptoms (a baseline: none at all)."""
    if not expected:
        return not got
    return expected <= got or ("diverged" in got and expected <= got | SUBSUMED_BY_DIVERGENCE)


def table_row(name: str, row: Row, runs: list[RunRecord], base: list[RunRecord] | None) -> str:
    m = metrics_of(runs)
    n = len(runs)
    symptoms: dict[str, int] = {}
    for r in runs:
        for s in r.summary.get("symptoms", []):
            symptoms[s] = symptoms.get(s, 0) + 1
    seen = ", ".join(f"{s} ({k}/{n})" for s, k in sorted(symptoms.items())) or "—"
    if row.expected is None:
        check = "not checked"
    else:
        check = "yes" if all(shows(row.expected, set(r.summary.get("symptoms", []))) for r in runs) else "**NO**"
        if check == "yes" and row.expected and symptoms.get("diverged") and "diverged" not in row.expected:
            check = f"yes (diverged instead on {symptoms['diverged']}/{n})"
    diverged = sum(1 for r in runs if r.summary.get("diverged"))
    against = "—" if base is None else verdict({k: (m[k], metrics_of(base)[k]) for k in m})
    train, val = (spread(m[k], none="diverged") for k in ("train loss", "val loss"))
    epochs = spread(m["epochs to 100%"], "{:g}")
    return f"| {name} | {train} | {val} | {epochs} | {diverged}/{n} | {seen} | {check} | {against} |"


def step_series(runs: list[RunRecord]) -> list[dict[str, list]]:
    out = []
    for r in runs:
        losses, norms = (r.step_losses()[:STEPS_KEPT], r.step_grad_norms()[:STEPS_KEPT]) if r.summary else ([], [])
        out.append({"loss": [sig(v) for v in losses], "grad_norm": [sig(v) for v in norms]})
    return out


def _median_curve(curves: list[list[float]]) -> list[float]:
    """Per index, the median of the seeds that still have a finite value there (a diverged seed drops out)."""
    length = max((len(c) for c in curves), default=0)
    med = []
    for i in range(length):
        vals = [c[i] for c in curves if i < len(c) and c[i] is not None and math.isfinite(c[i])]
        med.append(statistics.median(vals) if vals else math.nan)
    return med


def overlay(name: str, steps: list[dict], base_steps: list[dict], runs: list[RunRecord], base: list[RunRecord],
            base_name: str, path: Path) -> None:
    fig, axes = figures.panels(3)
    for label, series, records, colour in ((base_name, base_steps, base, "0.45"), (name, steps, runs, "C3")):
        for ax, key in zip(axes[:2], ("loss", "grad_norm"), strict=True):
            curves = [figures.finite(s[key], ceiling=1e30) for s in series]
            for c in curves:
                ax.plot(range(1, len(c) + 1), c, color=colour, alpha=0.25, lw=0.7)
            med = _median_curve(curves)
            ax.plot(range(1, len(med) + 1), med, color=colour, lw=2, label=f"{label} (median)")
        vals = [figures.finite(r.curve("val_loss"), ceiling=1e30) for r in records]
        for c in vals:
            axes[2].plot(range(1, len(c) + 1), c, color=colour, alpha=0.25, lw=0.7)
        med = _median_curve(vals)
        axes[2].plot(range(1, len(med) + 1), med, color=colour, lw=2, label=f"{label} (median)")
    for ax, ylabel, xlabel in zip(axes, ("train loss per step (log)", "grad norm per step (log)",
                                         "validation loss per epoch (log)"), ("step", "step", "epoch"), strict=True):
        ax.set(yscale="log", xlabel=xlabel, ylabel=ylabel)
        ax.legend(fontsize=7)
    n = len(runs)
    figures.save(fig, path, f"--break {name} vs {base_name}: {n} seeds each (faint), median bold; "
                 f"first {STEPS_KEPT} steps", "make break")


def _first(values: list, test) -> int | None:
    """1-based index of the first value passing `test` (None if none does)."""
    return next((i + 1 for i, v in enumerate(values) if v is not None and test(v)), None)


def step_facts(steps: dict[str, list[dict]]) -> str:
    """The per-step numbers experiments.md cites, each per seed and then median [min–max]: steps.md."""
    rows: list[tuple[str, str, list]] = []

    def add(what: str, run: str, values: list) -> None:
        if run in steps:
            rows.append((what, run, values))

    def series(run: str, key: str) -> list[list]:
        return [s[key] for s in steps.get(run, [])]

    for k in (1, 2, 3):
        for key, label in (("loss", "train loss"), ("grad_norm", "grad norm")):
            add(f"{label} at step {k}", "huge-lr", [x[k - 1] if len(x) >= k else None for x in series("huge-lr", key)])
    add("steps with a finite loss before the run stopped", "huge-lr",
        [sum(1 for v in x if v is not None) for x in series("huge-lr", "loss")])
    for run in ("baseline", "no-zero-grad", "baseline, SGD without momentum, lr 0.5",
                "no-zero-grad, SGD without momentum, lr 0.5", "baseline, Adam", "no-zero-grad, Adam"):
        g, losses = series(run, "grad_norm"), series(run, "loss")
        add("grad norm at step 10 / at step 1", run, [x[9] / x[0] if len(x) >= 10 and x[9] else None for x in g])
        if run.startswith("no-zero-grad"):
            alarm = [_first(x, lambda v, x0=x[0]: v > 5 * x0) for x in g]
            jump = [_first(lo, lambda v, l0=lo[0]: v > 2 * l0) for lo in losses]
            add("first step with grad norm > 5x its step-1 value", run, alarm)
            add("first step with loss > 2x its step-1 value", run, jump)
            add("steps the grad norm warned before the loss", run,
                [j - a if j and a else None for j, a in zip(jump, alarm, strict=True)])
    for run in ("baseline", "no-shuffle"):
        losses = series(run, "loss")
        add("lowest loss of steps 1-5 (sorted storage: class-0 batches)", run, [min(x[:5]) for x in losses])
        add("highest loss of steps 6-11 (class-1 batches arrive)", run, [max(x[5:11]) for x in losses])
    for run, base in (("sum-loss", "baseline"), ("sum-loss, world 2", "baseline, world 2")):
        ratios = [a[0] / b[0] for a, b in zip(series(run, "grad_norm"), series(base, "grad_norm"), strict=True)]
        add(f"grad norm at step 1 / {base}'s", run, ratios)
    for run, base in (("no-eval-mode", "baseline"), ("no-eval-mode, no dropout", "baseline, no dropout")):
        pairs = list(zip(series(run, "loss"), series(base, "loss"), strict=True))
        add(f"first step whose loss differs from {base}'s (0 = none)", run,
            [_first([a != b for a, b in zip(x, y, strict=True)], bool) or 0 for x, y in pairs])
    lines = [f"Per-step facts from steps.json (the first {STEPS_KEPT} steps of every seed), median [min–max] over the "
             "seeds, with each seed's value. Steps count from 1. Regenerate with `make break`.", "",
             "| measured | run | median [min–max] | per seed |", "|---|---|---:|---|"]
    for what, run, values in rows:
        lines.append(f"| {what} | {run} | {spread(values, '{:.4g}', 'none')} "
                     f"| {', '.join('—' if v is None else f'{v:.4g}' for v in values)} |")
    return "\n".join(lines) + "\n"


def batchnorm_eval_batches(runs: list[RunRecord], out: Path) -> str:
    """Validation loss of the BatchNorm baseline's final weights, in eval mode and in train mode at two eval batch
    sizes: train mode normalises each batch with its own statistics, so the number depends on the batch."""
    from spine.checkpoint import load_for_eval

    rows: dict[str, list[float]] = {"eval mode (running statistics)": []}
    rows.update({f"train mode, eval batch {b}": [] for b in EVAL_BATCHES})
    for r in runs:
        model, _cfg, data, _state = load_for_eval(r.ckpt_dir / "last.pt")
        x, y = data.val_x, data.val_y
        with torch.no_grad():
            model.eval()
            rows["eval mode (running statistics)"].append(torch.nn.functional.cross_entropy(model(x), y).item())
            for b in EVAL_BATCHES:
                m = copy.deepcopy(model).train()  # a copy: train-mode forwards move the running statistics
                total = sum(torch.nn.functional.cross_entropy(m(x[i:i + b]), y[i:i + b], reduction="sum").item()
                            for i in range(0, len(x), b))
                rows[f"train mode, eval batch {b}"].append(total / len(x))
    lines = ["Validation loss of the `baseline, BatchNorm` runs' final weights (one value per seed, median [min–max]), "
             "measured three ways on the same 80 validation samples. Regenerate with `make break`.", "",
             "| measured | validation loss |", "|---|---:|"]
    lines += [f"| {k} | {spread(v)} |" for k, v in rows.items()]
    text = "\n".join(lines) + "\n"
    (out / "bn.md").write_text(text)
    return text


def _finished(root: Path, name: str) -> bool:
    return (root / "runs" / name / "summary.json").exists()


def _on_disk(root: Path, spec: tuple[list[str], str]) -> RunRecord:
    """A run of an earlier invocation, read back (its exit code from its summary: 3 if it diverged)."""
    args, name = spec
    record = RunRecord(name, args, 0, "", "", root / "runs" / name, root / "checkpoints" / name)
    record.returncode = 3 if record.summary.get("diverged") else 0
    return record


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/break")
    p.add_argument("--only", nargs="*", help="run just these (names as in the table) and their baselines")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=40, help="epochs of every run (the tests use fewer)")
    p.add_argument("--figures", nargs="*", help="draw only these runs' figures (default: all; ~1 s each)")
    p.add_argument("--no-tensorboard", action="store_true", help="accepted for compatibility: always off here")
    p.add_argument("--reuse", action="store_true", help="read runs already on disk under <out>/break-runs instead of "
                   "running them again (to redraw tables and figures; make break never reuses)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = experiments()
    names = [n for n in table if not args.only or n in args.only]
    names += [b for b in dict.fromkeys(table[n].baseline for n in names) if b and b not in names]
    names = [n for n in table if n in names]
    seeds = range(args.seeds)
    runs: dict[str, list[RunRecord]] = {}
    for world in (1, 2):
        chosen = [(n, s) for n in names if table[n].world == world for s in seeds]
        specs = [(BASE + table[n].flags + ["--epochs", str(args.epochs), "--seed", str(s)], f"{slug(n)}-s{s}")
                 for n, s in chosen]
        todo = [sp for sp in specs if not (args.reuse and _finished(out / "break-runs", sp[1]))]
        ran = run_many(todo, out / "break-runs", world) if todo else []
        fresh = dict(zip((sp[1] for sp in todo), ran, strict=True))
        done = [fresh.get(sp[1]) or _on_disk(out / "break-runs", sp) for sp in specs]
        for (n, _s), r in zip(chosen, done, strict=True):
            runs.setdefault(n, []).append(r)
    lines = [f"Every deliberate bug against its baseline (same flags but the mistake), seeds 0–{args.seeds - 1}; "
             "each cell is median [min–max] over the seeds. \"Outside baseline spread?\" compares the mistake's "
             "median with its baseline's [min–max] (epochs to 100% train accuracy, final train and validation "
             "loss; a diverged run counts as infinite). Regenerate with `make break`.", "",
             "| run | final train loss | final val loss | epochs to 100% train acc | diverged | symptoms seen (seeds) "
             "| expected symptoms seen | outside baseline spread? |", "|---|---:|---:|---:|---|---|---|---|"]
    ok = True
    steps: dict[str, list[dict]] = {}
    for name in names:
        row, rs = table[name], runs[name]
        steps[name] = step_series(rs)
        for r in rs:
            crashed = r.returncode not in (0, 3) or not r.summary
            got = set(r.summary.get("symptoms", []))
            print(f"{r.name:44s} exit {r.returncode}  symptoms: {sorted(got)}", flush=True)
            ok = ok and not crashed and (row.expected is None or shows(row.expected, got))
        lines.append(table_row(name, row, rs, runs.get(row.baseline)))
    for name in names:
        row = table[name]
        if row.baseline and (args.figures is None or name in args.figures) and all(r.summary for r in runs[name]):
            overlay(name, steps[name], steps[row.baseline], runs[name], runs[row.baseline], row.baseline,
                    out / f"{slug(name)}.png")
    text = "\n".join(lines) + "\n"
    (out / "break.md").write_text(text)
    (out / "steps.json").write_text(json.dumps({"steps_kept": STEPS_KEPT, "seeds": list(seeds), "runs": steps},
                                               separators=(",", ":")) + "\n")
    keep = ("final", "epochs_to_100_train_acc", "steps_to_100_train_acc", "epochs_to_target_loss", "diverged",
            "divergence", "symptoms", "initial_loss", "first_step_loss", "exact_val", "replica_checksums")
    (out / "results.json").write_text(json.dumps(
        {n: {"flags": table[n].flags, "baseline": table[n].baseline,
             "expected": None if table[n].expected is None else sorted(table[n].expected),
             "seeds": [{"seed": s, "returncode": r.returncode, "summary": {k: r.summary.get(k) for k in keep}}
                       for s, r in zip(seeds, runs[n], strict=True)]}
         for n in names}, indent=1, default=str) + "\n")
    (out / "steps.md").write_text(step_facts(steps))
    print(text)
    if "baseline, BatchNorm" in runs:
        print(batchnorm_eval_batches(runs["baseline, BatchNorm"], out))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
