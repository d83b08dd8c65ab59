"""The benchmark's one table, from the JSON lines the workers and the end-to-end timer wrote.

Throughput is steps per second (a step is one optimizer step; at world 2 both ranks step together).
A ratio pairs two loops within the same repeat and reports the median over repeats (min-max), so slow
phases of a shared machine hit both sides of a pair alike.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

Sizes = list[tuple[str, str, int]]  # (label, hidden widths, epochs)


def _runs(rows: list[dict], label: str, world: int, kind: str) -> dict[int, dict]:
    return {r["repeat"]: r for r in rows if r["label"] == label and r["world"] == world and r["kind"] == kind}


def _rate(r: dict) -> float:
    return r["steps"] / r["seconds"]


def _paired(rows: list[dict], label: str, world: int, a: str, b: str, f: Callable[[dict, dict], float]) -> list[float]:
    runs_a, runs_b = _runs(rows, label, world, a), _runs(rows, label, world, b)
    return [f(runs_a[k], runs_b[k]) for k in sorted(runs_a.keys() & runs_b.keys())]


def _fmt(values: list[float], spec: str = "{:.2f}") -> str:
    if not values:
        return "n/a"
    median = spec.format(statistics.median(values))
    return median if len(values) == 1 else f"{median} ({spec.format(min(values))}–{spec.format(max(values))})"


def _verdict(values_by_size: dict[str, list[float]], targets: dict[str, float], at_least: bool, unit: str = "") -> str:
    missed = []
    for label, values in values_by_size.items():
        if not values or label not in targets:
            continue
        value, target = statistics.median(values), targets[label]
        if (value < target) if at_least else (value > target):
            missed.append(f"{label} by {abs(target - value):.2f}{unit}")
    return "**missed**: " + ", ".join(missed) if missed else "met"


def build_table(rows: list[dict], sizes: Sizes) -> str:
    labels = [label for label, _, _ in sizes]
    epochs = {label: e for label, _, e in sizes}
    lines = ["| measurement | " + " | ".join(f"{label} MLP {h} ({e} epochs)" for label, h, e in sizes)
             + " | target | verdict |", "|---|" + "---:|" * len(sizes) + "---|---|"]

    def row(name: str, cells: dict[str, str], target: str = "", verdict: str = "") -> None:
        lines.append(f"| {name} | " + " | ".join(cells.get(label, "n/a") for label in labels)
                     + f" | {target} | {verdict} |")

    def rates(world: int, kind: str) -> dict[str, str]:
        return {label: _fmt([_rate(r) for r in _runs(rows, label, world, kind).values()], "{:,.0f}")
                for label in labels}

    def ratio(world: int, a: str, b: str) -> dict[str, list[float]]:
        return {label: _paired(rows, label, world, a, b, lambda x, y: _rate(x) / _rate(y)) for label in labels}

    fmt = lambda d, spec="{:.2f}": {k: _fmt(v, spec) for k, v in d.items()}  # noqa: E731

    row("(a) bare loop, world 1: steps/s", rates(1, "bare"))
    row("(b) tutorial loop (DataLoader, DistributedSampler, log line every step): steps/s", rates(1, "tutorial"))
    row("(c) train.py epoch loop, defaults, TensorBoard on: steps/s", rates(1, "train.py"))
    c_a = ratio(1, "train.py", "bare")
    row("**(c)/(a)**", fmt(c_a), "tiny ≥ 0.90, medium ≥ 0.97",
        _verdict(c_a, {"tiny": 0.90, "medium": 0.97}, at_least=True))
    row("(b)/(a)", fmt(ratio(1, "tutorial", "bare")))
    c_b = ratio(1, "train.py", "tutorial")
    row("**(c)/(b)**", fmt(c_b), "> 1 (faster than the tutorial)",
        _verdict(c_b, {label: 1.0 for label in labels}, at_least=True))
    extra = {label: _paired(rows, label, 1, "train.py", "bare",
                            lambda x, y, e=epochs[label]: 1000 * (x["seconds"] - y["seconds"]) / e)
             for label in labels}
    row("train.py's extra time per epoch over (a), ms", fmt(extra, "{:.1f}"))
    outside = {label: [1000 * (r["call_seconds"] - r["seconds"]) for r in _runs(rows, label, 1, "train.py").values()]
               for label in labels}
    row("train() outside the epoch loop (set-up, summary), ms per run", fmt(outside, "{:.0f}"))
    bookkeeping = {label: [100 * (1 - v) for v in values]
                   for label, values in ratio(1, "train.py", "train.py quiet").items()}
    row("TensorBoard + per-step logging + console: % of (c)'s time vs all off", fmt(bookkeeping, "{:.1f}%"),
        "≤ 3%", _verdict(bookkeeping, {label: 3.0 for label in labels}, at_least=False, unit=" points"))
    ckpt = {label: [100 * r["checkpoint_seconds"] / r["seconds"] for r in _runs(rows, label, 1, "train.py").values()]
            for label in labels}
    saves = {label: sorted({r["checkpoints"] for r in _runs(rows, label, 1, "train.py").values()}) for label in labels}
    row("checkpoint writing at the default cadence: % of (c)'s loop",
        {label: f"{_fmt(v, '{:.1f}%')}, {'/'.join(map(str, saves[label]))} save(s)" for label, v in ckpt.items()},
        "≤ 2%", _verdict(ckpt, {label: 2.0 for label in labels}, at_least=False, unit=" points"))
    row("(d) world 2 (gloo), bare DDP loop: steps/s", rates(2, "bare"))
    row("(d) world 2 (gloo), train.py epoch loop: steps/s", rates(2, "train.py"))
    d = ratio(2, "train.py", "bare")
    row("**(d) train.py / bare DDP, world 2**", fmt(d), "≥ 0.95",
        _verdict(d, {label: 0.95 for label in labels}, at_least=True))
    threads = ratio(1, "bare default threads", "bare")
    first = labels[0]
    row(f"bare loop at train.py's default threads ({_threads(rows, first, 'bare default threads')}) / at "
        f"{_threads(rows, first, 'bare')} thread", fmt(threads))
    row("threads at train.py's default: ranks × threads per rank vs physical cores",
        {label: _thread_budget(rows, label) for label in labels}, "never above the cores",
        "met" if all(_thread_budget(rows, label).endswith("ok") for label in labels) else "**missed**")
    floor = [r["seconds"] for r in _runs(rows, "end to end", 1, "floor").values()]
    for kind in ("make overfit", "make overfit --threads 1"):
        wall = [r["seconds"] for r in _runs(rows, "end to end", 1, kind).values()]
        if not wall:
            continue
        e2e = _paired(rows, "end to end", 1, kind, "floor", lambda x, y: x["seconds"] / y["seconds"])
        lines.append(f"| end to end: `{kind}` (its command), s / floor (import torch, one Adam step), s / ratio | "
                     f"{_fmt(wall)} s / {_fmt(floor)} s / {_fmt(e2e)}× |" + " |" * (len(sizes) - 1) + " | |")
    return "\n".join(lines)


def _threads(rows: list[dict], label: str, kind: str) -> str:
    found = sorted({r["threads_per_rank"] for r in _runs(rows, label, 1, kind).values()})
    return "/".join(map(str, found)) or "n/a"


def _thread_budget(rows: list[dict], label: str) -> str:
    cells = []
    for world in (1, 2):
        runs = list(_runs(rows, label, world, "train.py").values())
        if runs:
            threads, cores = runs[0]["default_threads"], runs[0]["physical_cores"]
            used = world * threads
            cells.append(f"world {world}: {world}×{threads} on {cores}, "
                         + ("ok" if used <= cores else "over"))
    return "; ".join(cells) or "n/a"
