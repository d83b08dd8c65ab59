"""Inside the optimizer: the papers' checks of the instruments (issue 13 §7), as report files and figures.

    python -m launch.inside_optimizer [--out reports/optimizer] [--parts eos,batch,world,ratios,lrfind]

Five parts, each writing <out>/<part>.json (every figure the write-up cites), a table <out>/<part>.md and a PNG:

- eos:    full-batch gradient descent on spirals at three lrs x 5 seeds; sharpness against 2/lr (Cohen et al. 2021).
- batch:  steps to a train-loss target against the batch size on the `rule` problem, lr tuned per batch over a
          grid (seed 0), then 5 seeds at the tuned lr; fit S = S_min (1 + B_crit / B) (McCandlish et al. 2018).
- world:  B_simple at world 2 (torchrun, micro-batch b per rank) and at world 1 with --grad-accum-steps 2 (same
          micro-batch), 5 seeds each, on the batch study's problem at its tuned lr for batch 2b.
- ratios: update-to-weight ratios (--layer-stats) of the default recipe, of --break huge-lr, and at lr / 100.
- lrfind: --lr-find on the default recipe over 5 seeds, against the working lr range of reports/overfit/study.md.

Then <out>/findings.md (the comparisons, e.g. B_crit / B_simple) and the generated blocks of
docs/inside-the-optimizer.md are refreshed from these files (launch.render_docs).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from launch import figures
from launch.render_docs import render
from launch.runner import ROOT, RunRecord, run, run_many

PARTS = ("eos", "batch", "world", "ratios", "lrfind")
DOC = ROOT / "docs" / "inside-the-optimizer.md"
QUIET = ["--print-every", "100000", "--checkpoint-every-epochs", "100000", "--checkpoint-every-seconds", "0",
         "--threads", "1"]

# Part 1: full-batch GD on spirals (200 samples, 160 train): the set is hard enough for the loss to stay up for a
# few hundred steps, long enough for the sharpness to reach 2/lr before cross-entropy lets it fall.
EOS_LRS = (0.25, 0.5, 1.0)
EOS_STEPS, EOS_EVERY, EOS_SEEDS = 600, 10, 5
EOS_RECIPE = ["--dataset", "spirals", "--optimizer", "sgd", "--momentum", "0", "--batch-size", "160",
              "--epochs", str(EOS_STEPS), "--sharpness-every", str(EOS_EVERY), "--no-tensorboard"]
NEAR = 0.9  # "at the edge": sharpness >= NEAR x 2/lr

# Part 2: the `rule` problem of make scale (32-d inputs, 4 classes, MLP 64-64) with 5,000 samples (4,000 train) and
# plain SGD, whose noise scale is what McCandlish et al. relate to the critical batch.
RULE = ["--dataset", "rule", "--dim", "32", "--classes", "4", "--noise", "0", "--hidden", "64,64",
        "--n-samples", "5000", "--optimizer", "sgd", "--momentum", "0"]
TARGET = 0.3  # train loss; make scale uses the same target on this problem
BATCHES = (16, 32, 64, 128, 256, 512, 1024)
EPOCHS = {16: 14, 32: 14, 64: 16, 128: 20, 256: 28, 512: 40, 1024: 64}  # budgets a little past the target
LIN_LR = 0.05  # at batch 16; the grid is this, scaled linearly with the batch, x LR_FACTORS
LR_FACTORS = (0.25, 0.5, 1.0, 2.0)
LR_CAP = 3.2
MAX_EXTEND = 3
BATCH_SEEDS = (0, 1, 2, 3, 4)
WINDOW_SAMPLES = 512  # steps-to-target reads a running mean of the step losses over >= this many samples
NOISE_MICRO = 32  # world part: micro-batch per rank (world 2) or per accumulation step (world 1); step batch 64

# Parts 3 and 4: the default recipe (moons, 200 samples, MLP 64-64, Adam lr 0.01, batch 32, 100 epochs).
DEFAULT_LR = 0.01
RATIO_SEEDS = LRFIND_SEEDS = (0, 1, 2, 3, 4)
RATIO_CASES = {"healthy (lr 0.01)": [], "--break huge-lr (lr x 1000)": ["--break", "huge-lr"],
               "lr 1e-4 (100x too small)": ["--lr", str(DEFAULT_LR / 100)]}


# ---------------------------------------------------------------- small statistics, shared and tested

def spread(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """median, min, max and count of the values that exist; the form every comparison is reported in."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def fmt(s: dict, digits: int = 3) -> str:
    """'median [min–max]' (n/N when some are missing is the caller's to add)."""
    if s["median"] is None:
        return "—"
    g = f"{{:.{digits}g}}"
    return f"{g.format(s['median'])} [{g.format(s['min'])}–{g.format(s['max'])}]"


def overlap(a: dict, b: dict) -> bool:
    """Whether two spreads' [min, max] ranges overlap: the differences we call 'not distinguishable'."""
    return a["n"] > 0 and b["n"] > 0 and a["min"] <= b["max"] and b["min"] <= a["max"]


def fit_critical_batch(batches: Sequence[float], steps: Sequence[float]) -> tuple[float, float]:
    """Fit S = S_min (1 + B_crit / B) in log space (every point's relative error counts the same); (S_min, B_crit).

    For a given B_crit the best log S_min is the mean of log S - log(1 + B_crit/B), so the search is one-dimensional:
    a coarse grid over log B_crit, then golden-section refinement around its best point."""
    if len(batches) != len(steps) or len(batches) < 2:
        raise ValueError("need at least two (batch, steps) points")
    logs = [math.log(s) for s in steps]

    def s_min_and_error(log_bc: float) -> tuple[float, float]:
        bc = math.exp(log_bc)
        resid = [ls - math.log1p(bc / b) for ls, b in zip(logs, batches, strict=True)]
        mean = sum(resid) / len(resid)
        return math.exp(mean), sum((r - mean) ** 2 for r in resid)

    lo, hi = math.log(min(batches)) - 6, math.log(max(batches)) + 6
    grid = [lo + (hi - lo) * i / 400 for i in range(401)]
    best = min(range(len(grid)), key=lambda i: s_min_and_error(grid[i])[1])
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        c, d = b - phi * (b - a), a + phi * (b - a)
        if s_min_and_error(c)[1] < s_min_and_error(d)[1]:
            b = d
        else:
            a = c
    log_bc = (a + b) / 2
    return s_min_and_error(log_bc)[0], math.exp(log_bc)


def steps_to_target(step_losses: Sequence[float], batch: int, target: float) -> int | None:
    """The first step whose running mean of step losses (over the last ceil(WINDOW_SAMPLES / batch) steps, so every
    batch size averages about the same number of samples) is <= target; None if never. Lags by half a window."""
    window = max(1, math.ceil(WINDOW_SAMPLES / batch))
    total = 0.0
    for i, loss in enumerate(step_losses):
        if not math.isfinite(loss):
            return None
        total += loss
        if i >= window:
            total -= step_losses[i - window]
        if i + 1 >= window and total / window <= target:
            return i + 1
    return None


def scalars(run_dir: Path, match: Callable[[str], bool]) -> dict[str, list[tuple[int, float]]]:
    """The TensorBoard scalar series of a run whose tag matches: tag -> [(step, value)], read with EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if match(tag):
                series.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(points) for tag, points in series.items()}


def _check(r: RunRecord, allow_fail: bool = False) -> RunRecord:
    if r.returncode != 0 and not allow_fail:
        raise RuntimeError(f"run {r.name} exited {r.returncode}: {r.output[-2000:]}")
    return r


def _table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> str:
    align = align or "|".join(["---"] + ["---:"] * (len(header) - 1))
    lines = ["| " + " | ".join(header) + " |", f"|{align}|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _write(out: Path, part: str, data: dict, md: str) -> None:
    (out / f"{part}.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / f"{part}.md").write_text(md)


# ---------------------------------------------------------------- part 1: edge of stability

def eos_metrics(sharpness: Sequence[Sequence[float]], lr: float) -> dict:
    """When the sharpness reaches NEAR x 2/lr, how close it stays while there, its peak, and where it ends."""
    edge = 2 / lr
    ratios = [(int(s), v / edge) for s, v in sharpness]
    near = [s for s, q in ratios if q >= NEAR]
    if not near:
        reach = last = None
        hover: list[float] = []
    else:
        reach, last = near[0], near[-1]
        hover = [q for s, q in ratios if reach <= s <= last]
    return {"first_ratio": ratios[0][1], "step_reached": reach, "last_step_near": last,
            "hover_steps": None if reach is None else last - reach,
            "hover_median_ratio": statistics.median(hover) if hover else None,
            "peak_ratio": max(q for _, q in ratios), "final_ratio": ratios[-1][1]}


def part_eos(out: Path, runs: Path) -> dict:
    data: dict = {"recipe": EOS_RECIPE, "near": NEAR, "lrs": {}}
    for lr in EOS_LRS:
        per_seed = []
        for seed in range(EOS_SEEDS):
            r = _check(run(EOS_RECIPE + QUIET + ["--lr", str(lr), "--seed", str(seed)], runs, f"eos-lr{lr:g}-s{seed}",
                           overwrite=True))
            sharp = r.summary["instruments"]["sharpness"]
            per_seed.append({"seed": seed, "sharpness": sharp, "step_losses": r.step_losses(),
                             "final_train_loss": r.summary["final"]["train_loss"], **eos_metrics(sharp, lr)})
        keys = ("first_ratio", "step_reached", "hover_steps", "hover_median_ratio", "peak_ratio", "final_ratio",
                "final_train_loss")
        data["lrs"][f"{lr:g}"] = {"lr": lr, "two_over_lr": 2 / lr, "seeds": per_seed,
                                  "reached": sum(s["step_reached"] is not None for s in per_seed),
                                  **{k: spread(s[k] for s in per_seed) for k in keys}}
    rows = []
    for key, d in data["lrs"].items():
        rows.append([key, f"{d['two_over_lr']:g}", fmt(d["first_ratio"]), f"{d['reached']}/{EOS_SEEDS}",
                     fmt(d["step_reached"]), fmt(d["hover_steps"]), fmt(d["hover_median_ratio"]),
                     fmt(d["peak_ratio"]), fmt(d["final_ratio"]), fmt(d["final_train_loss"])])
    md = (f"Full-batch GD (SGD, no momentum, batch = all 160 training samples of spirals), {EOS_STEPS} steps, "
          f"sharpness every {EOS_EVERY} steps, seeds 0-{EOS_SEEDS - 1}; median [min–max] over seeds. Ratios are "
          f"sharpness / (2/lr); 'at the edge' is a ratio >= {NEAR}. Regenerate: `make optimizer`.\n\n"
          + _table(["lr", "2/lr", "ratio at step 0", "seeds at the edge", "first step at the edge",
                    "steps at the edge (first to last)", "median ratio while there", "peak ratio", "final ratio",
                    "final train loss"], rows))
    _write(out, "eos", data, md)
    _eos_figure(data, out / "eos.png")
    return data


def _eos_figure(data: dict, path: Path) -> None:
    fig, (ax, lx) = figures.panels(2)
    for i, (key, d) in enumerate(data["lrs"].items()):
        color = f"C{i}"
        for s in d["seeds"]:
            steps, values = zip(*s["sharpness"], strict=True)
            ax.plot(steps, values, color=color, lw=1.6 if s["seed"] == 0 else 0.6, alpha=1 if s["seed"] == 0 else 0.5,
                    label=f"lr {key}" if s["seed"] == 0 else None)
            lx.plot(range(1, len(s["step_losses"]) + 1), s["step_losses"], color=color,
                    lw=1.2 if s["seed"] == 0 else 0.5, alpha=1 if s["seed"] == 0 else 0.5,
                    label=f"lr {key}" if s["seed"] == 0 else None)
        ax.axhline(d["two_over_lr"], color=color, ls="--", lw=1)
    ax.set(xlabel="step", ylabel="sharpness (top Hessian eigenvalue)", title="sharpness; dashed: 2/lr")
    lx.set(xlabel="step", ylabel="full-batch train loss", yscale="log", title="train loss")
    ax.legend()
    lx.legend()
    figures.save(fig, path, "Edge of stability: full-batch GD on spirals (seed 0 bold, seeds 1-4 thin)",
                 "make optimizer")


# ---------------------------------------------------------------- part 2: steps to target against the batch

def lr_grid(batch: int) -> list[float]:
    lin = LIN_LR * batch / BATCHES[0]
    return sorted({round(min(lin * f, LR_CAP), 6) for f in LR_FACTORS})


def _batch_run(runs: Path, batch: int, lr: float, seed: int) -> dict:
    r = run(RULE + QUIET + ["--no-tensorboard", "--batch-size", str(batch), "--lr", str(lr), "--seed", str(seed),
                            "--epochs", str(EPOCHS[batch])], runs, f"b{batch}-lr{lr:g}-s{seed}", overwrite=True)
    _check(r, allow_fail=True)  # a too-large lr of the grid may diverge: that is "not reached", not an error
    losses = r.step_losses()
    return {"batch": batch, "lr": lr, "seed": seed, "returncode": r.returncode, "steps_run": len(losses),
            "steps": steps_to_target(losses, batch, TARGET)}


def _tune(runs: Path, batch: int, seed: int) -> list[dict]:
    """The grid's runs at one batch; while its best lr is also its largest, one more run at twice that lr, so the
    tuned lr is never just the grid's edge (at most MAX_EXTEND more, and never above LR_CAP)."""
    results = [_batch_run(runs, batch, lr, seed) for lr in lr_grid(batch)]
    for _ in range(MAX_EXTEND):
        reached = [g for g in results if g["steps"] is not None]
        top = max(g["lr"] for g in results)
        if not reached or min(reached, key=lambda g: (g["steps"], g["lr"]))["lr"] != top or top >= LR_CAP:
            break
        results.append(_batch_run(runs, batch, min(2 * top, LR_CAP), seed))
    return results


def part_batch(out: Path, runs: Path) -> dict:
    grid = [g for b in BATCHES for g in _tune(runs, b, BATCH_SEEDS[0])]
    tuned: dict[int, float] = {}
    for b in BATCHES:
        reached = [g for g in grid if g["batch"] == b and g["steps"] is not None]
        if reached:
            tuned[b] = min(reached, key=lambda g: (g["steps"], g["lr"]))["lr"]
    seeds = [g for g in grid if tuned.get(g["batch"]) == g["lr"]]
    seeds += [_batch_run(runs, b, lr, s) for b, lr in tuned.items() for s in BATCH_SEEDS[1:]]
    per_batch = {}
    for b, lr in tuned.items():
        steps = [g["steps"] for g in seeds if g["batch"] == b]
        per_batch[str(b)] = {"lr": lr, "steps": steps, "spread": spread(steps)}
    usable = [b for b in tuned if all(s is not None for s in per_batch[str(b)]["steps"])]
    fits = []
    for i, seed in enumerate(BATCH_SEEDS):  # one fit per seed: the spread of B_crit over seeds
        s_min, b_crit = fit_critical_batch(usable, [per_batch[str(b)]["steps"][i] for b in usable])
        fits.append({"seed": seed, "s_min": s_min, "b_crit": b_crit})
    s_min, b_crit = fit_critical_batch(usable, [per_batch[str(b)]["spread"]["median"] for b in usable])
    data = {"recipe": RULE, "target_loss": TARGET, "window_samples": WINDOW_SAMPLES, "epochs": EPOCHS,
            "grid": grid, "tuned_lr": {str(b): lr for b, lr in tuned.items()}, "per_batch": per_batch,
            "fit_of_medians": {"s_min": s_min, "b_crit": b_crit}, "fits_per_seed": fits,
            "b_crit": spread(f["b_crit"] for f in fits), "s_min": spread(f["s_min"] for f in fits)}
    rows = []
    for b in BATCHES:
        cells = {g["lr"]: ("—" if g["steps"] is None else str(g["steps"])) for g in grid if g["batch"] == b}
        d = per_batch.get(str(b))
        rows.append([b, ", ".join(f"{lr:g}: {c}" for lr, c in cells.items()), f"{d['lr']:g}" if d else "—",
                     fmt(d["spread"]) if d else "—", f"{s_min * (1 + b_crit / b):.0f}"])
    md = (f"Steps until the running mean of the step losses (over >= {WINDOW_SAMPLES} samples) is <= {TARGET}: `rule` "
          f"problem (32-d, 4 classes, 5,000 samples, MLP 64-64, plain SGD). lr tuned per batch on seed 0 over the grid "
          f"(linear-scaled {LIN_LR:g} x batch/16 x {LR_FACTORS}, capped at {LR_CAP:g}, and extended x2 upwards while "
          f"its largest lr is the best, at most {MAX_EXTEND} times); then seeds {BATCH_SEEDS} at "
          "the tuned lr, median [min–max]. Regenerate: `make optimizer`.\n\n"
          + _table(["batch", "seed 0: lr: steps (— not reached)", "tuned lr", "steps at the tuned lr",
                    "fit S_min (1 + B_crit/B)"], rows)
          + f"\nFit of S = S_min (1 + B_crit / B) to the medians: S_min = {s_min:.0f} steps, B_crit = {b_crit:.0f}. "
          f"One fit per seed: B_crit = {fmt(data['b_crit'])}, S_min = {fmt(data['s_min'])}.\n")
    _write(out, "batch", data, md)
    _batch_figure(data, out / "steps_vs_batch.png")
    return data


def _batch_figure(data: dict, path: Path) -> None:
    fig, (ax,) = figures.panels(1)
    bs = [int(b) for b in data["per_batch"]]
    for i in range(len(BATCH_SEEDS)):
        pts = [(b, data["per_batch"][str(b)]["steps"][i]) for b in bs if data["per_batch"][str(b)]["steps"][i]]
        ax.plot(*zip(*pts, strict=True), "o", color="C0", alpha=0.5, label="each seed" if i == 0 else None)
    med = [(b, data["per_batch"][str(b)]["spread"]["median"]) for b in bs if data["per_batch"][str(b)]["spread"]["n"]]
    ax.plot(*zip(*med, strict=True), "s-", color="C0", label="median")
    f = data["fit_of_medians"]
    xs = [bs[0] * (bs[-1] / bs[0]) ** (i / 100) for i in range(101)]
    ax.plot(xs, [f["s_min"] * (1 + f["b_crit"] / x) for x in xs], "--", color="C3",
            label=f"S_min (1 + B_crit/B): S_min {f['s_min']:.0f}, B_crit {f['b_crit']:.0f}")
    ax.axhline(f["s_min"], color="C3", lw=0.6, ls=":")
    ax.axvline(f["b_crit"], color="C3", lw=0.6, ls=":")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel=f"steps to train loss <= {data['target_loss']}")
    ax.legend()
    figures.save(fig, path, "Steps to target against batch (lr tuned per batch)", "make optimizer")


# ---------------------------------------------------------------- part 2b: B_simple at world 2 and world 1

def part_world(out: Path, runs: Path) -> dict:
    batch_file = out / "batch.json"
    step_batch = 2 * NOISE_MICRO
    lr = (json.loads(batch_file.read_text())["tuned_lr"].get(str(step_batch)) if batch_file.exists() else None) \
        or LIN_LR * step_batch / BATCHES[0]
    common = RULE + QUIET + ["--noise-scale", "--noise-scale-every", "1",  # every step: the smoothest estimate
                             "--lr", str(lr), "--epochs", str(EPOCHS[step_batch])]
    w1 = [_check(run(common + ["--batch-size", str(NOISE_MICRO), "--grad-accum-steps", "2", "--seed", str(s)],
                     runs, f"noise-w1-s{s}", overwrite=True)) for s in BATCH_SEEDS]
    w2 = [_check(r) for r in run_many([(common + ["--batch-size", str(NOISE_MICRO), "--seed", str(s)], f"noise-w2-s{s}")
                                       for s in BATCH_SEEDS], runs, world=2, timeout=900)]
    data: dict = {"micro_batch": NOISE_MICRO, "step_batch": step_batch, "lr": lr, "target_loss": TARGET, "layouts": {}}
    for label, records in (("world 1, --grad-accum-steps 2", w1), ("world 2 (torchrun)", w2)):
        seeds = []
        for s, r in zip(BATCH_SEEDS, records, strict=True):
            series = scalars(r.run_dir, lambda t: t == "noise/b_simple").get("noise/b_simple", [])
            reach = steps_to_target(r.step_losses(), step_batch, TARGET)
            # B_simple at the target: the first logged estimate at or after the step the loss reaches it.
            at_target = next((v for st, v in series if reach is not None and st >= reach), None)
            seeds.append({"seed": s, "final": r.summary["instruments"]["noise_scale"], "steps_to_target": reach,
                          "b_simple_at_target": at_target, "series": series})
        data["layouts"][label] = {
            "seeds": seeds, "final_b_simple": spread(x["final"]["b_simple"] for x in seeds),
            "b_simple_at_target": spread(x["b_simple_at_target"] for x in seeds),
            "final_g2": spread(x["final"]["g2"] for x in seeds),
            "final_trace_sigma": spread(x["final"]["trace_sigma"] for x in seeds)}
    a, b = data["layouts"].values()
    data["agree_final"] = overlap(a["final_b_simple"], b["final_b_simple"])
    data["agree_at_target"] = overlap(a["b_simple_at_target"], b["b_simple_at_target"])
    rows = [[label, fmt(d["b_simple_at_target"]), fmt(d["final_b_simple"]), fmt(d["final_g2"]),
             fmt(d["final_trace_sigma"])] for label, d in data["layouts"].items()]
    md = (f"B_simple = tr(Σ)/|G|² from micro-batch {NOISE_MICRO} against the step's {step_batch} (lr {lr:g}, "
          f"{EPOCHS[step_batch]} epochs, seeds {BATCH_SEEDS}; median [min–max]). 'At the target': the first logged "
          f"estimate once train loss <= {TARGET}. Regenerate: `make optimizer`.\n\n"
          + _table(["layout", "B_simple at the target", "final B_simple", "final |G|²", "final tr(Σ)"], rows,
                   "---|---:|---:|---:|---:")
          + f"\nRanges overlap (not distinguishable): at the target {data['agree_at_target']}, "
          f"final {data['agree_final']}.\n")
    _write(out, "world", data, md)
    _world_figure(data, out / "noise_scale.png")
    return data


def _world_figure(data: dict, path: Path) -> None:
    fig, (ax,) = figures.panels(1)
    for i, (label, d) in enumerate(data["layouts"].items()):
        for s in d["seeds"]:
            if s["series"]:
                ax.plot(*zip(*s["series"], strict=True), color=f"C{i}", lw=0.8,
                        label=label if s["seed"] == BATCH_SEEDS[0] else None)
    ax.set(xlabel="step", ylabel="B_simple (EMA)", yscale="log")
    ax.legend()
    figures.save(fig, path, f"B_simple, micro-batch {data['micro_batch']} vs step batch {data['step_batch']}",
                 "make optimizer")


# ---------------------------------------------------------------- part 3: update-to-weight ratios

EARLY = 50  # steps: the first 10 epochs of the default recipe, where the loss does most of its falling


def ratio_phases(series: dict[str, list[tuple[int, float]]]) -> dict[str, float | None]:
    """Over every tensor: the median ratio at the first logged step, over steps <= EARLY, and after EARLY."""
    def med(pred: Callable[[int], bool]) -> float | None:
        vals = [v for pts in series.values() for st, v in pts if pred(st)]
        return statistics.median(vals) if vals else None

    first = min((pts[0][0] for pts in series.values() if pts), default=None)
    return {"first_step": med(lambda st: st == first), "early": med(lambda st: st <= EARLY),
            "late": med(lambda st: st > EARLY)}


def part_ratios(out: Path, runs: Path) -> dict:
    data: dict = {"cases": {}, "early_steps": EARLY}
    for ci, (label, flags) in enumerate(RATIO_CASES.items()):
        per_seed = []
        for seed in RATIO_SEEDS:
            r = _check(run(QUIET + ["--layer-stats", "--log-every", "1", "--seed", str(seed)] + flags, runs,
                           f"ratio{ci}-s{seed}", overwrite=True))
            series = scalars(r.run_dir, lambda t: t.startswith("per_layer.") and t.endswith(".update_ratio"))
            dead = scalars(r.run_dir, lambda t: t.startswith("per_layer.") and t.endswith("/dead_fraction"))
            per_seed.append({"seed": seed, "returncode": r.returncode,
                             "logged_steps": max((len(v) for v in series.values()), default=0),
                             "median": {t: statistics.median(v for _, v in pts) for t, pts in series.items()},
                             **ratio_phases(series),
                             "final_dead_fraction": statistics.mean(pts[-1][1] for pts in dead.values()),
                             "final_train_loss": r.summary["final"]["train_loss"]})
        tags = sorted({t for s in per_seed for t in s["median"]})
        data["cases"][label] = {
            "flags": flags, "seeds": per_seed, "exit_codes": [s["returncode"] for s in per_seed],
            "median": {t: spread(s["median"].get(t) for s in per_seed) for t in tags},
            **{k: spread(s[k] for s in per_seed) for k in ("first_step", "early", "late", "final_dead_fraction",
                                                           "final_train_loss")}}
    tags = sorted({t for d in data["cases"].values() for t in d["median"]})
    cases = list(data["cases"].values())
    phase_rows = [[name] + [fmt(d[key]) for d in cases] for name, key in (
        ("ratio at step 1", "first_step"), (f"ratio, steps 1–{EARLY}", "early"), (f"ratio, steps > {EARLY}", "late"),
        ("dead ReLU fraction at the end (mean of layers)", "final_dead_fraction"),
        ("final train loss", "final_train_loss"))]
    rows = [[t.removeprefix("per_layer.").removesuffix(".update_ratio")] + [fmt(d["median"][t]) for d in cases]
            for t in tags]
    md = ("Update-to-weight ratio ‖Δw‖/‖w‖ per parameter tensor (`--layer-stats --log-every 1`), default recipe "
          "(moons, MLP 64-64, Adam, batch 32, 100 epochs = 500 steps); median [min–max] over seeds "
          f"{RATIO_SEEDS}. Each seed's figure is the median over every tensor and step of the phase. "
          "Rule of thumb: about 1e-3. Regenerate: `make optimizer`.\n\n"
          + _table(["", *RATIO_CASES], phase_rows)
          + "\nPer tensor, median over all 500 steps:\n\n" + _table(["tensor", *RATIO_CASES], rows)
          + "\nExit codes per seed: " + "; ".join(f"{k}: {d['exit_codes']}" for k, d in data["cases"].items()) + "\n")
    _write(out, "ratios", data, md)
    _ratios_figure(data, out / "update_ratios.png", runs)
    return data


def _ratios_figure(data: dict, path: Path, runs: Path) -> None:
    fig, (ax,) = figures.panels(1)
    for ci, label in enumerate(data["cases"]):
        series = scalars(runs / "runs" / f"ratio{ci}-s0", lambda t: t.endswith(".update_ratio"))
        for j, (_tag, pts) in enumerate(sorted(series.items())):
            ax.plot(*zip(*pts, strict=True), color=f"C{ci}", lw=0.8, alpha=0.4 + 0.6 * (j == 0),
                    label=label if j == 0 else None)
    ax.axhline(1e-3, color="k", ls="--", lw=0.8, label="1e-3 rule of thumb")
    ax.set(xlabel="step", ylabel="‖Δw‖/‖w‖ (every tensor)", yscale="log")
    ax.legend()
    figures.save(fig, path, "Update-to-weight ratios, seed 0", "make optimizer")


# ---------------------------------------------------------------- part 4: LR range test

def working_range(study: Path) -> dict:
    """The Adam lrs of Part 2's study (reports/overfit/study.md) whose outcome is 'converges'."""
    converged, tried = [], []
    for line in study.read_text().splitlines():
        m = re.match(r"\| learning rate \(Adam\) \| lr ([0-9.e+-]+) \| ([^|]+)\|", line)
        if m:
            tried.append(float(m[1]))
            if m[2].strip().startswith("converges"):
                converged.append(float(m[1]))
    if not converged:
        raise ValueError(f"{study}: no converging Adam lr found")
    return {"tried": tried, "converged": converged, "low": min(converged), "high": max(converged)}


def part_lrfind(out: Path, runs: Path) -> dict:
    rng = working_range(ROOT / "reports" / "overfit" / "study.md")
    seeds = []
    for seed in LRFIND_SEEDS:
        r = _check(run(QUIET + ["--no-tensorboard", "--lr-find", "--seed", str(seed)], runs, f"lrfind-s{seed}",
                       overwrite=True))
        result = json.loads((r.run_dir / "lr_find.json").read_text())
        seeds.append({"seed": seed, "suggestion": result["suggestion"], "stop_reason": result["stop_reason"],
                      "steps": result["steps"]})
    sug = spread(s["suggestion"] for s in seeds)
    (out / "lr_find.png").write_bytes((runs / "runs" / f"lrfind-s{LRFIND_SEEDS[0]}" / "lr_find.png").read_bytes())
    # Train at the suggestion and at the default lr: the suggestion is only useful if it trains.
    trained = {}
    for label, lr in (("suggested (median)", sug["median"]), ("default", DEFAULT_LR)):
        rs = [_check(run(QUIET + ["--no-tensorboard", "--lr", f"{lr:.6g}", "--seed", str(s)], runs,
                         f"lrfind-train-{label[:3]}-s{s}", overwrite=True)) for s in LRFIND_SEEDS]
        trained[label] = {"lr": lr, "epochs_to_target_loss": spread(r.summary["epochs_to_target_loss"] for r in rs),
                          "reached": sum(r.summary["epochs_to_target_loss"] is not None for r in rs),
                          "epochs_to_100_train_acc": spread(r.summary["epochs_to_100_train_acc"] for r in rs)}
    inside = [s["suggestion"] is not None and rng["low"] <= s["suggestion"] <= rng["high"] for s in seeds]
    data = {"working_range": rng, "seeds": seeds, "suggestion": sug, "inside_range": sum(inside),
            "trained": trained}
    rows = [[s["seed"], f"{s['suggestion']:.3g}" if s["suggestion"] else "—", s["steps"], s["stop_reason"]]
            for s in seeds]
    trows = [[label, f"{d['lr']:.3g}", fmt(d["epochs_to_target_loss"]), f"{d['reached']}/{len(LRFIND_SEEDS)}",
              fmt(d["epochs_to_100_train_acc"])] for label, d in trained.items()]
    md = (f"`--lr-find` (Adam, batch 32, lr 1e-6 to 10 over 200 steps) on the default recipe, seeds {LRFIND_SEEDS}. "
          f"Working range from reports/overfit/study.md: Adam lrs that converge within 100 epochs: "
          f"{', '.join(f'{x:g}' for x in rng['converged'])} (of {', '.join(f'{x:g}' for x in rng['tried'])}). "
          "Regenerate: `make optimizer`.\n\n"
          + _table(["seed", "suggested lr", "steps", "stopped because"], rows, "---:|---:|---:|---")
          + f"\nSuggestion: {fmt(sug)}; inside the working range [{rng['low']:g}, {rng['high']:g}] for "
          f"{sum(inside)}/{len(seeds)} seeds.\n\nTraining the default recipe at the median suggestion and at the "
          "default lr (100 epochs, same seeds):\n\n"
          + _table(["lr", "value", "epochs to loss <= 1e-3", "seeds reaching it", "epochs to 100% train acc"], trows))
    _write(out, "lrfind", data, md)
    return data


# ---------------------------------------------------------------- the comparisons and the document

def findings(out: Path) -> str:
    """The cross-part comparisons, from the report files alone."""
    lines = []
    batch, world = out / "batch.json", out / "world.json"
    if batch.exists() and world.exists():
        b, w = json.loads(batch.read_text()), json.loads(world.read_text())
        w1 = w["layouts"]["world 1, --grad-accum-steps 2"]
        bc = b["b_crit"]
        for key, label in (("b_simple_at_target", "at the target"), ("final_b_simple", "at the end of training")):
            bs = w1[key]
            if bs["median"] and bc["median"]:
                lines.append(f"- B_crit / B_simple ({label}): {bc['median'] / bs['median']:.2f} (medians: B_crit "
                             f"{fmt(bc)}, B_simple {fmt(bs)}; extremes {bc['min'] / bs['max']:.2f}–"
                             f"{bc['max'] / bs['min']:.2f}).")
    text = "\n".join(lines) + "\n" if lines else "(run the batch and world parts first)\n"
    (out / "findings.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/optimizer")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--runs", default="", help="where the runs go (default: <out>/inside-runs, ignored by git)")
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    bad = [x for x in parts if x not in PARTS]
    if bad:
        print(f"inside_optimizer.py: error: unknown part(s) {','.join(bad)}; choose from {','.join(PARTS)}",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs) if args.runs else out / "inside-runs"
    jobs = {"eos": part_eos, "batch": part_batch, "world": part_world, "ratios": part_ratios, "lrfind": part_lrfind}
    for part in parts:
        t = time.time()
        jobs[part](out, runs)
        print(f"{part}: {time.time() - t:.0f} s -> {out / (part + '.md')}", flush=True)
    print(findings(out))
    if DOC.exists() and out.resolve() == (ROOT / "reports" / "optimizer").resolve():
        try:
            DOC.write_text(render(DOC.read_text()))
        except FileNotFoundError as e:  # a part not run yet: its block keeps its old text
            print(f"inside_optimizer.py: {DOC.name} not refreshed: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
