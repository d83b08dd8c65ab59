"""The benchmark's one table, from the JSON lines launch/bench.py and its workers wrote.

train.py against the bare loop: each run of train.py alternates with the bare loop block by block
(launch/bench_worker.py), a pair is two adjacent blocks, and a run's ratio is the median over its pairs; the table
gives the median over runs (repeats) with their min-max, and judges a target on that median. Other ratios pair two
loops within the same repeat and report the median over repeats with the min-max.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from launch.bench_worker import CASES, THREAD_CASES

TARGETS = {"default": 0.90, "rule20k": 0.95, "medium": 0.95, "world2": 0.95}  # train.py / bare loop, at least
LOGGING_MAX, CHECKPOINT_MAX, THREADS_MIN, END_TO_END_MAX = 0.02, 0.02, 0.8, 1.2
DRIFT_MIN_CHUNKS = 20  # the fewest drift chunks its deciles are read from
NOISE_SCALE_MAX = 0.03  # --noise-scale's share of a world-2 step


def _by_repeat(rows: list[dict], **match) -> dict[int, dict]:
    return {r["repeat"]: r for r in rows if all(r.get(k) == v for k, v in match.items())}


def _paired(a: dict[int, dict], b: dict[int, dict], f: Callable[[dict, dict], float]) -> list[float]:
    return [f(a[k], b[k]) for k in sorted(a.keys() & b.keys())]


def spread(values: list[float], spec: str = "{:.2f}") -> str:
    if not values:
        return "n/a"
    median = spec.format(statistics.median(values))
    return median if len(values) == 1 else f"{median} ({spec.format(min(values))}–{spec.format(max(values))})"


def verdict(values: list[float], target: float, at_least: bool, unit: str = "") -> str:
    if not values:
        return "not measured"
    value = statistics.median(values)
    missed = value < target if at_least else value > target
    margin = abs(value - target)  # beside a median printed to three decimals, a small miss needs four
    return f"**missed** by {margin:.{2 if margin >= 0.005 else 4}f}{unit}" if missed else "met"


def _run_ratio(run: dict) -> float:
    """One train.py run's ratio to the bare loop: the median over its pairs of adjacent blocks."""
    return statistics.median(bare / ours for bare, ours in run["pairs"])


def _relative_time(run: dict) -> float:
    """A run's time relative to the bare blocks it alternated with: comparable between runs of the same repeat."""
    return run["seconds"] / run["bare_seconds"]


def _clocked(rows: list[dict], case: str, key: str) -> list[float]:
    """Per train.py run of `case`, the seconds rank 0's clock `key` counted, as a share of its loop."""
    return [r[key] / r["loop_seconds"] for r in _by_repeat(rows, case=case, kind="train.py").values()]


def _percent(shares: list[float]) -> str:
    return spread([100 * v for v in shares], "{:.1f}%")


def build_table(rows: list[dict], cases: list[str]) -> str:
    lines = ["| measurement | value: median (min–max) | target | verdict |", "|---|---:|---|---|"]

    def row(name: str, value: str, target: str = "", result: str = "") -> None:
        lines.append(f"| {name} | {value} | {target} | {result} |")

    runs = {name: list(_by_repeat(rows, case=name, kind="train.py").values()) for name in cases}
    pairs = {name: [bare / ours for r in runs[name] for bare, ours in r["pairs"]] for name in cases}
    for name in cases:  # first: train.py against the bare loop doing the same work, judged on every pair
        per_run = [_run_ratio(r) for r in runs[name]]
        # Three decimals for the median judged against the target: a verdict at the edge shows as one.
        value = (f"{statistics.median(pairs[name]):.3f} ({min(per_run):.2f}–{max(per_run):.2f})" if pairs[name]
                 else "n/a")
        row(f"**train.py / bare loop with validation**, {CASES[name].label}: the median over every pair (min–max "
            f"of the runs' medians)", value, f"≥ {TARGETS[name]:.2f}",
            verdict(pairs[name], TARGETS[name], at_least=True))
    for name in cases:
        if len(pairs[name]) > 1:
            low, median, high = statistics.quantiles(pairs[name], n=4)
            row(f"the same, pairs of a train.py block ({CASES[name].block} epoch(s)) and its two bare neighbours, "
                f"median (interquartile range): {name}", f"{median:.2f} ({low:.2f}–{high:.2f}), "
                f"{len(pairs[name])} pairs in {len(runs[name])} runs")
    for name in cases:
        row(f"ms per epoch, bare / train.py: {name}",
            f"{spread([r['bare_seconds'] / r['epochs'] * 1000 for r in runs[name]], '{:.1f}')} / "
            f"{spread([r['seconds'] / r['epochs'] * 1000 for r in runs[name]], '{:.1f}')}")
    for name in cases:  # judged by the clock: the whole-run difference below is tens of times wider than 2%
        share = _clocked(rows, name, "logging_seconds")
        row(f"TensorBoard + per-step scalars + console at default cadence, rank 0's clock, % of the loop: {name}",
            _percent(share), f"≤ {LOGGING_MAX:.0%}", verdict(share, LOGGING_MAX, at_least=False))
    for name in cases:  # no target: the cost of the grad norm's default cadence
        row(f"grad norm on the logged steps (every --log-every), rank 0's clock, % of the loop: {name}",
            _percent(_clocked(rows, name, "grad_norm_seconds")))
    for name in (c for c in cases if CASES[c].world == 1):
        ours, quiet = _by_repeat(rows, case=name, kind="train.py"), _by_repeat(rows, case=name, kind="train.py quiet")
        share = _paired(ours, quiet, lambda t, q: 1 - _relative_time(q) / _relative_time(t))
        row(f"logging, grad norm and --log-every checks, whole-run difference against train.py without them "
            f"(each run's time over its bare blocks, paired; spread wider than the target), % of train.py's time: "
            f"{name}", _percent(share))
    for name in cases:
        ours, noise = _by_repeat(rows, case=name, kind="train.py"), _by_repeat(rows, case=name,
                                                                               kind="train.py noise-scale")
        if noise:
            own = [r["noise_seconds"] / r["loop_seconds"] for r in noise.values()]
            row(f"--noise-scale at its default cadence (one step in --log-every), its own code by rank 0's clock, "
                f"% of the loop: {name}", _percent(own), f"≤ {NOISE_SCALE_MAX:.0%}",
                verdict(own, NOISE_SCALE_MAX, at_least=False))
            share = _paired(ours, noise, lambda t, n: 1 - _relative_time(t) / _relative_time(n))
            row(f"--noise-scale, whole-run difference against train.py (each run's time over its bare blocks, "
                f"paired; spread wider than the target), % of its run's time: {name}", _percent(share))
    for name in cases:
        share = _clocked(rows, name, "checkpoint_seconds")
        saves = sorted({r["checkpoints"] for r in _by_repeat(rows, case=name, kind="train.py").values()})
        row(f"checkpoints at the default cadence ({'/'.join(map(str, saves))} save(s) per run of "
            f"{CASES[name].epochs} epochs), % of the loop: {name}", _percent(share),
            f"≤ {CHECKPOINT_MAX:.0%}", verdict(share, CHECKPOINT_MAX, at_least=False))
    for name in cases:  # no target: a lower bound on what the collective non-finite stop, always on, costs
        row(f"non-finite checks (every --log-every steps, each epoch's end, each save), rank 0's clock, % of the "
            f"loop: {name}", _percent(_clocked(rows, name, "guard_seconds")))
    for load in ("idle", "loaded"):
        for name in THREAD_CASES:
            one, every, default = (_by_repeat(rows, case=name, kind=f"threads {k}", load=load)
                                   for k in ("1", "all", "default"))
            if not default:
                continue
            # The better setting by its median, then paired per repeat: the minimum of two noisy runs per repeat
            # would sit below the default even where the default is that very setting.
            better_label, better = min((("1 thread", one), ("all cores", every)),
                                       key=lambda kv: statistics.median(r["seconds"] for r in kv[1].values()))
            ratio = [better[k]["seconds"] / default[k]["seconds"] for k in sorted(better.keys() & default.keys())]
            chosen = sorted({r["threads"] for r in default.values()})
            row(f"threads: default ({'/'.join(map(str, chosen))} of {next(iter(default.values()))['cores']} cores) "
                f"/ the better of 1 thread and all cores by median ({better_label}), {load}: {name}", spread(ratio),
                f"≥ {THREADS_MIN}", verdict(ratio, THREADS_MIN, at_least=True))
    drift = [r["seconds"] for r in sorted(_by_repeat(rows, case="drift").values(), key=lambda r: r["repeat"])]
    if len(drift) >= DRIFT_MIN_CHUNKS:  # the noise that every pair above has to beat
        median = statistics.median(drift)
        deciles = statistics.quantiles([s / median for s in drift], n=10)
        row(f"machine speed drift, {len(drift)} chunks of 25 bare steps (rule20k) in a row: a chunk's time per step "
            f"over the median, 10th–90th percentile", f"{deciles[0]:.2f}–{deciles[-1]:.2f}")
        for lag, span in ((1, "the next chunk"), (10, "the chunk 10 later (about one rule20k epoch)")):
            ratios = [later / earlier for earlier, later in zip(drift, drift[lag:], strict=False)]
            deciles = statistics.quantiles(ratios, n=10)
            row(f"machine speed drift: {span}'s time over a chunk's, 10th–90th percentile",
                f"{deciles[0]:.2f}–{deciles[-1]:.2f}")
    summary_writer, event_file = (_by_repeat(rows, case="tensorboard events", kind=k) for k in ("SummaryWriter",
                                                                                                "EventFile"))
    if event_file:
        events = next(iter(event_file.values()))["events"]
        for key, what in (("seconds", "the calling thread's wall time"), ("cpu_seconds", "all threads' CPU")):
            row(f"TensorBoard, {events} events written and flushed, ms, {what}: SummaryWriter (its writer thread) / "
                f"spine's EventFile (the loop's thread)",
                f"{spread([1000 * r[key] for r in summary_writer.values()], '{:.1f}')} / "
                f"{spread([1000 * r[key] for r in event_file.values()], '{:.1f}')}")
        ratio = _paired(summary_writer, event_file, lambda a, b: a["seconds"] / b["seconds"])
        row("TensorBoard, the calling thread's wall time, SummaryWriter / EventFile (pairs)", f"{spread(ratio)}×")
    per_tensor, foreach = (_by_repeat(rows, case="optimizer update", kind=k) for k in ("per-tensor", "foreach"))
    if foreach:
        steps = next(iter(foreach.values()))["steps"]
        row(f"Adam's update on the default recipe's model, µs per step over {steps} steps: torch's per-tensor loop "
            f"(its CPU default) / the foreach update build_optimizer asks for",
            f"{spread([1e6 * r['seconds'] / steps for r in per_tensor.values()], '{:.0f}')} / "
            f"{spread([1e6 * r['seconds'] / steps for r in foreach.values()], '{:.0f}')}")
        ratio = _paired(per_tensor, foreach, lambda a, b: a["seconds"] / b["seconds"])
        row("Adam's update, per-tensor / foreach (pairs; the same weights bit for bit)", f"{spread(ratio)}×")
    overfit, floor = _by_repeat(rows, case="end to end", kind="make overfit"), _by_repeat(rows, case="end to end",
                                                                                            kind="floor")
    if overfit:
        ratio = _paired(overfit, floor, lambda o, f: o["seconds"] / f["seconds"])
        row("end to end: `make overfit` as a fresh process / floor (import torch, one Adam step)",
            f"{spread(ratio)}× ({spread([r['seconds'] for r in overfit.values()], '{:.2f}')} s against "
            f"{spread([r['seconds'] for r in floor.values()], '{:.2f}')} s)", f"≤ {END_TO_END_MAX}×",
            verdict(ratio, END_TO_END_MAX, at_least=False, unit="×"))
    return "\n".join(lines)
