"""make scale: vary dataset size, batch size (with and without the learning rate scaled), world size and
gradient accumulation, several seeds each; measure, tabulate and plot.

    python -m launch.scale [--out reports/scale] [--size tiny|default|large] [--worlds 1,2] [--device cpu]

One recipe throughout: the `rule` dataset (32-d Gaussian inputs, 4 classes), MLP 64-64, SGD with momentum
0.9, learning rate 0.01 at a global batch of 16; "scaled" multiplies it by batch / 16 (the linear rule).
Groups of runs (each config with --seeds seeds):
  data    dataset size over 2 decades (largest 100k samples) at a fixed batch: convergence, epoch time
  batch   global batch over 2+ decades, fixed vs scaled learning rate: steps/epochs to the target loss, stability
  world   world size (torchrun; gloo on CPU, nccl with --device cuda and any --worlds) x batch: throughput,
          speedup, efficiency; on CPU world 1 also with 2 threads, the other way to use the second core
  accum   the large global batches again, reached by accumulating micro-batches (--grad-accum-steps)
  probe   per-step compute vs all-reduce time at each world size (launch/scale_probe.py)
World-1 runs execute in this process; each world size > 1 runs as one torchrun job (launch/runner.py).
Outputs under --out: runs.csv (every run), summary.md (tables), probe.json, PNG figures; the runs
themselves (TensorBoard events with hparams, metrics.jsonl, summary.json) under <out>/scale-runs/runs.
Exit code 1 if a run fails for any reason other than divergence (which is a result, recorded as such).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launch import figures
from launch.runner import TORCHRUN, RunRecord, run_many

ROOT = Path(__file__).resolve().parents[1]

BASE_LR, BASE_BATCH, TARGET_LOSS = 0.01, 16, 0.3
RECIPE = ["--dataset", "rule", "--dim", "32", "--classes", "4", "--noise", "0", "--hidden", "64,64",
          "--optimizer", "sgd", "--momentum", "0.9", "--target-loss", str(TARGET_LOSS),
          "--checkpoint-every-epochs", "1000", "--print-every", "1000", "--log-every", "1000"]


@dataclass(frozen=True)
class Preset:
    seeds: int
    data_sizes: tuple[int, ...]  # total samples (train + validation)
    data_batch: int
    data_epochs: int
    batch_sizes: tuple[int, ...]  # global batch sizes
    batch_samples: int
    batch_epochs: int
    world_batches: tuple[int, ...]
    world_epochs: int
    accum_batches: tuple[int, ...]  # a subset of world_batches, reached again by accumulation
    accum_micro: int  # per-rank micro-batch of the accumulated runs
    probe_steps: int


PRESETS = {
    # For the test of this script only: every code path in seconds, with 1 seed (no conclusion can come from it).
    "tiny": Preset(seeds=1, data_sizes=(250, 500, 2500), data_batch=32, data_epochs=1,
                   batch_sizes=(8, 16, 64, 128), batch_samples=1000, batch_epochs=2,
                   world_batches=(64,), world_epochs=1, accum_batches=(64,), accum_micro=16, probe_steps=5),
    "default": Preset(seeds=5, data_sizes=(1000, 3000, 10_000, 30_000, 100_000), data_batch=128, data_epochs=8,
                      batch_sizes=(16, 64, 256, 1024, 4096), batch_samples=20_000, batch_epochs=10,
                      world_batches=(64, 512, 4096), world_epochs=3, accum_batches=(512, 4096), accum_micro=64,
                      probe_steps=60),
    "large": Preset(seeds=5, data_sizes=(1000, 3000, 10_000, 30_000, 100_000, 300_000, 1_000_000), data_batch=128,
                    data_epochs=10, batch_sizes=(16, 64, 256, 1024, 4096, 16_384), batch_samples=100_000,
                    batch_epochs=15, world_batches=(64, 512, 4096, 16_384), world_epochs=3,
                    accum_batches=(512, 4096, 16_384), accum_micro=64, probe_steps=200),
}

CSV_FIELDS = ["group", "name", "seed", "world", "threads", "per_rank_batch", "grad_accum_steps", "global_batch",
              "lr_mode", "lr", "n_samples", "n_train", "epochs", "returncode", "diverged", "final_train_loss",
              "final_val_loss", "final_val_acc", "epochs_to_target", "steps_to_target", "samples_per_sec",
              "epoch_seconds", "wall_seconds"]


@dataclass(frozen=True)
class Spec:
    group: str
    seed: int
    n_samples: int
    global_batch: int
    lr_mode: str  # "fixed" or "scaled"
    epochs: int
    world: int = 1
    threads: int = 1
    accum: int = 1

    @property
    def lr(self) -> float:
        return BASE_LR * (self.global_batch / BASE_BATCH if self.lr_mode == "scaled" else 1)

    @property
    def per_rank_batch(self) -> int:
        return self.global_batch // (self.world * self.accum)

    @property
    def name(self) -> str:
        return (f"{self.group}-n{self.n_samples}-b{self.global_batch}-{self.lr_mode}-w{self.world}-t{self.threads}"
                f"-k{self.accum}-s{self.seed}")

    def args(self, device: str, tensorboard: bool) -> list[str]:
        return RECIPE + ["--n-samples", str(self.n_samples), "--epochs", str(self.epochs), "--seed", str(self.seed),
                         "--lr", f"{self.lr:g}", "--global-batch-size", str(self.global_batch),
                         "--grad-accum-steps", str(self.accum), "--threads", str(self.threads),
                         "--device", device] + ([] if tensorboard else ["--no-tensorboard"])


def plan(p: Preset, worlds: list[int], cpu: bool) -> list[Spec]:
    seeds = range(p.seeds)
    specs = [Spec("data", s, n, p.data_batch, "scaled", p.data_epochs) for n in p.data_sizes for s in seeds]
    for b in p.batch_sizes:
        modes = ("fixed",) if b == BASE_BATCH else ("fixed", "scaled")  # at the base batch they are the same run
        specs += [Spec("batch", s, p.batch_samples, b, m, p.batch_epochs) for m in modes for s in seeds]
    layouts = [(w, 1) for w in worlds] + ([(1, 2)] if cpu and 1 in worlds else [])
    specs += [Spec("world", s, p.batch_samples, b, "scaled", p.world_epochs, w, t)
              for b in p.world_batches for w, t in layouts for s in seeds]
    specs += [Spec("accum", s, p.batch_samples, b, "scaled", p.world_epochs, w, 1, b // (w * p.accum_micro))
              for b in p.accum_batches for w in worlds for s in seeds if b // (w * p.accum_micro) > 1]
    return specs


def run_specs(specs: list[Spec], out: Path, device: str, tensorboard: bool) -> list[RunRecord]:
    """Every spec, world 1 in this process and each (world, threads) group of the others in one torchrun job."""
    records: dict[Spec, RunRecord] = {}
    for world, threads in sorted({(s.world, s.threads) for s in specs}):
        group = [s for s in specs if (s.world, s.threads) == (world, threads)]
        done = run_many([(s.args(device, tensorboard), s.name) for s in group], out, world, threads=threads)
        records.update(zip(group, done, strict=True))
        print(f"scale: {len(group)} run(s) at world {world} x {threads} thread(s) done", flush=True)
    return [records[s] for s in specs]


def csv_row(spec: Spec, r: RunRecord) -> dict:
    s, final = r.summary, r.summary.get("final") or {}
    epochs = r.metrics
    return {
        "group": spec.group, "name": spec.name, "seed": spec.seed, "world": spec.world, "threads": spec.threads,
        "per_rank_batch": spec.per_rank_batch, "grad_accum_steps": spec.accum, "global_batch": spec.global_batch,
        "lr_mode": spec.lr_mode, "lr": spec.lr, "n_samples": spec.n_samples,
        "n_train": spec.n_samples - max(1, round(spec.n_samples * 0.2)), "epochs": spec.epochs,
        "returncode": r.returncode, "diverged": bool(s.get("diverged")),
        "final_train_loss": final.get("train_loss"), "final_val_loss": final.get("val_loss"),
        "final_val_acc": final.get("val_acc"),
        "epochs_to_target": s.get("epochs_to_target_loss"), "steps_to_target": s.get("steps_to_target_loss"),
        # Medians over epochs: one epoch slowed by another process on a shared machine does not move them.
        "samples_per_sec": statistics.median(m["samples_per_sec"] for m in epochs) if epochs else None,
        "epoch_seconds": statistics.median(m["epoch_seconds"] for m in epochs) if epochs else None,
        "wall_seconds": s.get("wall_seconds"),
    }


def run_probe(world: int, p: Preset, out: Path, device: str) -> list[dict]:
    path = out / f"probe-w{world}.json"
    batches = ",".join(str(b) for b in p.world_batches)
    launcher = [TORCHRUN, "--standalone", f"--nproc_per_node={world}"] if world > 1 else [sys.executable]
    proc = subprocess.run(launcher + ["-m", "launch.scale_probe", "--out", str(path), "--batches", batches,
                                      "--steps", str(p.probe_steps), "--device", device],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"probe at world {world} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------- statistics


def median_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x; returns (a, b, R^2)."""
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return a, b, 1 - ss_res / ss_tot if ss_tot and n > 2 else float("nan")


def select(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def fmt(v, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return format(v, spec)


def spread(values: list[float | None]) -> str:
    """median [min–max] of the finite values."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "—"
    return f"{fmt(statistics.median(vals))} [{fmt(min(vals))}–{fmt(max(vals))}]"


def reached(rows: list[dict], key: str) -> str:
    got = [r[key] for r in rows if r[key] is not None]
    if not got:
        return f"not reached (0/{len(rows)})"
    text = fmt(statistics.median(got), "g")
    return text if len(got) == len(rows) else f"{text} ({len(got)}/{len(rows)} seeds)"


# ------------------------------------------------------------------------------------------------- tables


def summary_tables(rows: list[dict], probes: list[dict], p: Preset, header: str) -> str:
    out = [header, ""]
    data = select(rows, group="data")
    sizes = sorted({r["n_samples"] for r in data})
    xs = [r["n_train"] for r in data if r["epoch_seconds"] is not None]
    ys = [r["epoch_seconds"] for r in data if r["epoch_seconds"] is not None]
    a, b, r2 = linear_fit(xs, ys)
    out += [f"### Dataset size (global batch {p.data_batch}, lr {BASE_LR * p.data_batch / BASE_BATCH:g}, "
            f"{p.data_epochs} epochs, world 1, {p.seeds} seeds)", "",
            "| samples (train) | epoch s | samples/s | final train loss | final val loss | val − train | val acc "
            f"| epochs to loss ≤ {TARGET_LOSS} | steps to it |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in sizes:
        g = select(data, n_samples=n)
        gap = [r["final_val_loss"] - r["final_train_loss"] for r in g
               if r["final_val_loss"] is not None and r["final_train_loss"] is not None]
        out.append(f"| {n:,} ({g[0]['n_train']:,}) | {fmt(median_or_none(r['epoch_seconds'] for r in g))} "
                   f"| {fmt(median_or_none(r['samples_per_sec'] for r in g), ',.0f')} "
                   f"| {spread([r['final_train_loss'] for r in g])} | {spread([r['final_val_loss'] for r in g])} "
                   f"| {fmt(median_or_none(gap))} | {spread([r['final_val_acc'] for r in g])} "
                   f"| {reached(g, 'epochs_to_target')} | {reached(g, 'steps_to_target')} |")
    out += ["", f"Epoch time vs training samples, least squares over every run: "
            f"**{a * 1000:.1f} ms + {b * 1e6:.2f} µs × samples, R² = {r2:.3f}**.", ""]

    batch = select(rows, group="batch")
    out += [f"### Batch size ({batch[0]['n_train']:,} training samples, {p.batch_epochs} epochs, world 1, "
            f"{p.seeds} seeds; scaled lr = {BASE_LR:g} × batch / {BASE_BATCH})" if batch else "", "",
            f"| global batch | lr | lr value | diverged | final train loss | spread (max − min) | final val loss "
            f"| epochs to loss ≤ {TARGET_LOSS} | steps to it | samples/s |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for gb in sorted({r["global_batch"] for r in batch}):
        for mode in ("fixed", "scaled"):
            g = select(batch, global_batch=gb, lr_mode=mode) or (select(batch, global_batch=gb, lr_mode="fixed")
                                                                 if gb == BASE_BATCH else [])
            if not g:
                continue
            losses = [r["final_train_loss"] for r in g if r["final_train_loss"] is not None]
            width = max(losses) - min(losses) if losses else None
            label = mode if gb != BASE_BATCH else "fixed = scaled"
            if gb == BASE_BATCH and mode == "scaled":
                continue
            out.append(f"| {gb} | {label} | {g[0]['lr']:g} | {sum(r['diverged'] for r in g)}/{len(g)} "
                       f"| {spread(losses)} | {fmt(width)} | {spread([r['final_val_loss'] for r in g])} "
                       f"| {reached(g, 'epochs_to_target')} | {reached(g, 'steps_to_target')} "
                       f"| {fmt(median_or_none(r['samples_per_sec'] for r in g), ',.0f')} |")

    world = select(rows, group="world") + select(rows, group="accum")
    out += ["", f"### World size and accumulation ({p.world_epochs} epochs, scaled lr, {p.seeds} seeds; samples/s is "
            "the median epoch's, over all ranks)", "",
            "| global batch | ranks × threads | per-rank batch × accumulation | samples/s | speedup vs 1 × 1 "
            "| efficiency | final train loss |", "|---:|---|---|---:|---:|---:|---:|"]
    for gb in sorted({r["global_batch"] for r in world}):
        base = median_or_none(r["samples_per_sec"] for r in select(world, global_batch=gb, world=1, threads=1,
                                                                    grad_accum_steps=1))
        layouts = sorted({(r["world"], r["threads"], r["grad_accum_steps"]) for r in select(world, global_batch=gb)},
                         key=lambda t: (t[2], t[0], t[1]))
        for w, t, k in layouts:
            g = select(world, global_batch=gb, world=w, threads=t, grad_accum_steps=k)
            thr = median_or_none(r["samples_per_sec"] for r in g)
            speed = thr / base if thr and base else None
            out.append(f"| {gb} | {w} × {t} | {g[0]['per_rank_batch']} × {k} | {fmt(thr, ',.0f')} "
                       f"| {fmt(speed, '.2f')} | {fmt(speed / (w * t) if speed else None, '.0%')} "
                       f"| {spread([r['final_train_loss'] for r in g])} |")
    out += ["", "Efficiency = speedup / cores used (ranks × threads). Accumulated runs compute the same step "
            "as the real batch of the same global size (see `tests/test_scale.py`).", ""]

    if probes:
        out += ["### Where a step's time goes (launch/scale_probe.py; medians per step, 1 thread per rank)", "",
                "| global batch | ranks | per-rank batch | forward+backward, no_sync (compute) | same, synced "
                "| synced − compute | bare all-reduce of the gradients | optimizer step |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(probes, key=lambda r: (r["global_batch"], r["world"])):
            out.append(f"| {r['global_batch']} | {r['world']} | {r['per_rank_batch']} | {r['compute_ms']:.2f} ms "
                       f"| {r['synced_ms']:.2f} ms | {r['synced_ms'] - r['compute_ms']:.2f} ms "
                       f"| {r['allreduce_ms']:.2f} ms | {r['optimizer_ms']:.2f} ms |")
        grad_kb = probes[0]["gradient_bytes"] / 1000
        out += ["", f"The model has {probes[0]['parameters']:,} parameters: each synced step all-reduces "
                f"{grad_kb:.0f} kB of gradients.", ""]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------ figures


def plot_all(rows: list[dict], probes: list[dict], out: Path, command: str) -> None:
    def save(fig, name: str, title: str) -> None:
        figures.save(fig, out / name, title, command)

    # Epoch time vs dataset size, with the fitted line.
    data = [r for r in select(rows, group="data") if r["epoch_seconds"] is not None]
    if data:
        xs, ys = [r["n_train"] for r in data], [r["epoch_seconds"] for r in data]
        a, b, r2 = linear_fit(xs, ys)
        fig, (ax,) = figures.panels(1, size=(6, 4))
        ax.scatter(xs, ys, s=14, label="runs (median epoch of each)")
        grid = sorted(set(xs))
        ax.plot(grid, [a + b * x for x in grid], "r-", label=f"fit {a * 1000:.1f} ms + {b * 1e6:.2f} µs·n, "
                f"R² = {r2:.3f}")
        ax.set(xscale="log", yscale="log", xlabel="training samples n", ylabel="epoch seconds")
        ax.legend(fontsize=8)
        save(fig, "epoch_time_vs_dataset_size.png", "Epoch time vs dataset size (world 1)")

    # Throughput vs global batch.
    fig, (ax,) = figures.panels(1, size=(6.5, 4))
    curves = [("1 rank × 1 thread (batch sweep)", dict(group="batch"), "o-")]
    for w, t in sorted({(r["world"], r["threads"]) for r in select(rows, group="world")}):
        curves.append((f"{w} rank(s) × {t} thread(s) (world sweep)", dict(group="world", world=w, threads=t), "s--"))
    for w in sorted({r["world"] for r in select(rows, group="accum")}):
        curves.append((f"{w} rank(s), accumulated micro-batches", dict(group="accum", world=w), "x:"))
    for label, match, style in curves:
        g = select(rows, **match)
        bs = sorted({r["global_batch"] for r in g})
        thr = [median_or_none(r["samples_per_sec"] for r in g if r["global_batch"] == b) for b in bs]
        ax.plot(bs, thr, style, label=label, markersize=6)
    ax.set(xscale="log", yscale="log", xlabel="global batch", ylabel="samples / s (median epoch)")
    ax.legend(fontsize=8)
    save(fig, "throughput_vs_batch.png", "Throughput vs batch size; x = the same global batch by accumulation")

    # Throughput vs world size: speedup and efficiency.
    world = select(rows, group="world")
    if world:
        fig, axes = figures.panels(3 if probes else 2, size=(14 / 3 if probes else 5, 4))
        batches = sorted({r["global_batch"] for r in world})
        layouts = sorted({(r["world"], r["threads"]) for r in world})
        width = 0.8 / len(layouts)
        for i, (w, t) in enumerate(layouts):
            thr = [median_or_none(r["samples_per_sec"] for r in select(world, global_batch=b, world=w, threads=t))
                   for b in batches]
            base = [median_or_none(r["samples_per_sec"] for r in select(world, global_batch=b, world=1, threads=1))
                    for b in batches]
            speed = [x / y if x and y else 0 for x, y in zip(thr, base, strict=True)]
            pos = [j + (i - (len(layouts) - 1) / 2) * width for j in range(len(batches))]
            axes[0].bar(pos, [x or 0 for x in thr], width, label=f"{w} rank(s) × {t} thread(s)")
            bars = axes[1].bar(pos, speed, width, label=f"{w} × {t}")
            for bar, s in zip(bars, speed, strict=True):
                axes[1].annotate(f"{s:.2f}×\n{s / (w * t):.0%}", (bar.get_x() + bar.get_width() / 2, s),
                                 ha="center", va="bottom", fontsize=7)
        for ax in axes[:2]:
            ax.set_xticks(range(len(batches)), [str(b) for b in batches])
            ax.set_xlabel("global batch")
        axes[0].set(yscale="log", ylabel="samples / s")
        axes[0].legend(fontsize=8)
        axes[1].axhline(1, color="k", lw=0.8)
        axes[1].set(ylabel="speedup vs 1 rank × 1 thread")
        axes[1].set_title("labels: speedup, efficiency = speedup / cores", fontsize=8)
        if probes:
            ax = axes[2]
            entries = sorted(probes, key=lambda r: (r["global_batch"], r["world"]))
            labels = [f"B={r['global_batch']}\n{r['world']} rank(s)" for r in entries]
            compute = [r["compute_ms"] for r in entries]
            comm = [max(0.0, r["synced_ms"] - r["compute_ms"]) for r in entries]
            ax.bar(labels, compute, label="forward+backward (no_sync)")
            ax.bar(labels, comm, bottom=compute, label="added by synced backward")
            ax.bar(labels, [r["optimizer_ms"] for r in entries], bottom=[c + m for c, m in zip(compute, comm,
                                                                                               strict=True)],
                   label="optimizer step")
            ax.scatter(labels, [r["allreduce_ms"] for r in entries], color="k", marker="_", s=300, zorder=3,
                       label="bare all-reduce alone")
            ax.set(ylabel="ms per step (median)")
            ax.tick_params(axis="x", labelsize=7)
            ax.legend(fontsize=7)
        save(fig, "throughput_vs_world_size.png", "Throughput vs world size: samples/s, speedup and efficiency, "
             "and where a step's time goes")

    # Epochs and steps to the target loss vs batch, fixed vs scaled lr.
    batch = select(rows, group="batch")
    if batch:
        fig, axes = figures.panels(2, size=(5, 4))
        for ax, key in zip(axes, ("epochs_to_target", "steps_to_target"), strict=True):
            for mode, style in (("fixed", "o-"), ("scaled", "s--")):
                bs, med, lo, hi, missed = [], [], [], [], []
                for b in sorted({r["global_batch"] for r in batch}):
                    g = select(batch, global_batch=b, lr_mode=mode) or (
                        select(batch, global_batch=b, lr_mode="fixed") if b == BASE_BATCH else [])
                    got = [r[key] for r in g if r[key] is not None]
                    if got:
                        bs.append(b)
                        med.append(statistics.median(got))
                        lo.append(statistics.median(got) - min(got))
                        hi.append(max(got) - statistics.median(got))
                    elif g:
                        missed.append(b)
                line = ax.errorbar(bs, med, yerr=[lo, hi], fmt=style, capsize=3, label=f"lr {mode}")
                if missed:
                    top = max(med) * 1.5 if med else 1
                    ax.scatter(missed, [top] * len(missed), marker="x", color=line[0].get_color(), s=60,
                               label=f"lr {mode}: not reached")
            ax.set(xscale="log", yscale="log", xlabel="global batch",
                   ylabel=key.replace("_", " ").replace("target", f"loss ≤ {TARGET_LOSS}"))
            ax.legend(fontsize=8)
        save(fig, "steps_to_target_vs_batch.png", "Epochs and steps to the target train loss vs batch size "
             "(median, min-max over seeds)")

        # Seed spread of the final loss vs batch.
        fig, (ax,) = figures.panels(1, size=(6.5, 4))
        for mode, marker, shift in (("fixed", "o", 0.93), ("scaled", "s", 1.07)):
            g = [r for r in batch if r["lr_mode"] == mode]
            xs = [r["global_batch"] * shift for r in g if r["final_train_loss"] is not None]
            ys = [r["final_train_loss"] for r in g if r["final_train_loss"] is not None]
            ax.scatter(xs, ys, marker=marker, label=f"lr {mode} (one point per seed)")
            dv = [r["global_batch"] * shift for r in g if r["diverged"]]
            if dv:
                ax.scatter(dv, [max(ys or [1]) * 2] * len(dv), marker="X", color="r", s=60, label="diverged")
        ax.set(xscale="log", yscale="log", xlabel="global batch", ylabel="final train loss")
        ax.legend(fontsize=8)
        save(fig, "seed_spread_vs_batch.png", "Final train loss across seeds vs batch size")


# --------------------------------------------------------------------------------------------------- main


def replot(out: Path, preset: Preset, command: str) -> int:
    """Tables and figures again from the saved measurements (the first line of summary.md is kept)."""
    try:
        raw = list(csv.DictReader((out / "runs.csv").open()))
        probes = json.loads((out / "probe.json").read_text())
        header = (out / "summary.md").read_text().splitlines()[0]
    except (OSError, ValueError) as e:
        print(f"scale.py: error: --replot needs runs.csv, probe.json and summary.md in {out}: {e}", file=sys.stderr)
        return 2
    rows = [{k: _typed(k, v) for k, v in r.items()} for r in raw]
    (out / "summary.md").write_text(summary_tables(rows, probes, preset, header))
    plot_all(rows, probes, out, command)
    return 0


def _typed(key: str, text: str):
    if key in ("group", "name", "lr_mode"):
        return text
    if key == "diverged":
        return text == "True"
    if text == "":
        return None
    number = float(text)
    return int(number) if key not in ("lr",) and not key.startswith(("final", "samples", "epoch_s", "wall")) \
        else number


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/scale")
    p.add_argument("--size", default="default", choices=PRESETS, help="sweep preset (make scale SCALE=large)")
    p.add_argument("--worlds", default="1,2", help="world sizes, comma-separated; > 2 needs as many GPUs or cores")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                   help="cpu: gloo; cuda: nccl, one GPU per rank")
    p.add_argument("--no-tensorboard", action="store_true", help="skip event files (faster; no HParams dashboard)")
    p.add_argument("--replot", action="store_true",
                   help="no runs: rebuild summary.md and the figures from --out's runs.csv and probe.json")
    args = p.parse_args()
    try:
        worlds = sorted({int(w) for w in args.worlds.split(",")})
    except ValueError:
        print(f"scale.py: error: --worlds expects comma-separated integers, got {args.worlds!r}", file=sys.stderr)
        return 2
    if not worlds or min(worlds) < 1 or 1 not in worlds:
        print(f"scale.py: error: --worlds must include 1 (the baseline), got {args.worlds!r}", file=sys.stderr)
        return 2
    preset = PRESETS[args.size]
    out = Path(args.out)
    runs_dir = out / "scale-runs"
    out.mkdir(parents=True, exist_ok=True)
    command = "make scale" + ("" if args.size == "default" else f" SCALE={args.size}")
    if args.replot:
        return replot(out, preset, command)
    load_before, started = os.getloadavg(), time.perf_counter()

    specs = plan(preset, worlds, cpu=args.device == "cpu")
    rows, ok = [], True
    for spec, r in zip(specs, run_specs(specs, runs_dir, args.device, not args.no_tensorboard), strict=True):
        failed = r.returncode not in (0, 3) or not r.summary
        ok = ok and not failed
        rows.append(csv_row(spec, r))
        if failed:
            print(f"{spec.name}: FAILED: {(r.output.strip().splitlines() or ['no output'])[-1]}", flush=True)
    probes = []
    for w in worlds:
        try:
            probes += run_probe(w, preset, out, args.device)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"scale.py: {e}", file=sys.stderr)
            ok = False
    (out / "probe.json").write_text(json.dumps(probes, indent=1) + "\n")
    for w in worlds:
        (out / f"probe-w{w}.json").unlink(missing_ok=True)

    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    minutes = (time.perf_counter() - started) / 60
    load_after = os.getloadavg()
    header = (f"Generated by `{command}` ({len(rows)} runs, {minutes:.1f} min; {os.cpu_count()} CPU(s), "
              f"{args.device}, {platform.python_implementation()} {platform.python_version()}; load average "
              f"{load_before[0]:.1f} before, {load_after[0]:.1f} after). Every run: `runs.csv`.")
    text = summary_tables(rows, probes, preset, header)
    (out / "summary.md").write_text(text)
    plot_all(rows, probes, out, command)
    print(text)
    print(f"TensorBoard (HParams tab): .venv/bin/tensorboard --logdir {runs_dir / 'runs'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
