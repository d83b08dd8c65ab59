"""--compile against eager on the digits recipe: compile time, graphs compiled, steady-state epoch time.

    python -m launch.compile_probe [--out reports/digits] [--repeats 3] [--epochs 3]

Modes: eager; --compile with dynamic=False (spine/compiler.py's choice: one static graph per batch shape); --compile
with dynamic=None (torch's default: a shape that changes is recompiled as a dynamic-shape graph). Each mode first
runs once with an empty inductor cache (the cold compile), then `--repeats` times with that cache warm, the modes
interleaved so that a change in the machine's load falls on all of them. Every run is its own process (fresh dynamo
state) at one thread. Writes <out>/compile.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from launch.digits import QUIET, RECIPE, spread
from launch.runner import ROOT

MODES = {"eager": None, "compile, dynamic=False": False, "compile, dynamic=None": None}


def child(mode: str, out: Path, epochs: int) -> dict:
    """One run in this process: epoch seconds, validation accuracy and dynamo's graph count."""
    import torch._dynamo.utils

    import spine.compiler
    from launch.runner import run

    spine.compiler.DYNAMIC = MODES[mode]
    flags = ["--compile"] if mode != "eager" else []
    args = [a for a in RECIPE if a not in ("--epochs", "10")] + ["--epochs", str(epochs)] + QUIET + flags
    r = run(args + ["--seed", "0"], out, "probe", overwrite=True)
    if r.returncode != 0:
        raise SystemExit(f"compile_probe: {mode} failed: {r.stderr.strip()[-500:]}")
    return {"epoch_seconds": [m["epoch_seconds"] for m in r.metrics], "val_acc": [m["val_acc"] for m in r.metrics],
            "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]}


def one_run(mode: str, cache: Path, out: Path, epochs: int) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "launch.compile_probe", "--child", mode, "--out", str(out),
                           "--epochs", str(epochs)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"compile_probe: {mode} failed: {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/digits")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out).resolve()
    if args.child:
        print(json.dumps(child(args.child, out / "compile-runs" / args.child.replace(" ", ""), args.epochs)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="compile-probe-") as tmp:
        caches = {mode: Path(tmp) / f"cache{i}" for i, mode in enumerate(MODES)}  # an empty cache per mode
        runs_out = out / "compile-runs"
        cold = {mode: one_run(mode, caches[mode], runs_out, args.epochs) for mode in MODES}
        warm: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                warm[mode].append(one_run(mode, caches[mode], runs_out, args.epochs))
    lines = [
        "# torch.compile against eager, digits recipe (issue 16)", "",
        f"Regenerate with `python -m launch.compile_probe --repeats {args.repeats} --epochs {args.epochs}`. "
        f"Recipe: `train.py {' '.join(RECIPE)}`, but {args.epochs} epochs, seed 0, one thread. Load average at the "
        f"end: {', '.join(f'{v:.1f}' for v in os.getloadavg())} (this machine has 2 cores shared with other jobs).", "",
        "| mode | graphs compiled | first epoch s, cold cache | first epoch s, warm cache | later epochs s, warm "
        "| val acc per epoch |", "|---|---:|---:|---:|---:|---|",
    ]
    for mode in MODES:
        later = [s for r in warm[mode] for s in r["epoch_seconds"][1:]]
        accs = {tuple(round(a, 4) for a in r["val_acc"]) for r in [cold[mode], *warm[mode]]}
        lines.append(f"| {mode} | {cold[mode]['graphs']} | {cold[mode]['epoch_seconds'][0]:.2f} | "
                     f"{spread([r['epoch_seconds'][0] for r in warm[mode]], '.2f')} | {spread(later, '.2f')} | "
                     f"{'; '.join(' '.join(f'{a:.2%}' for a in acc) for acc in sorted(accs))} |")
    lines += ["", f"Cold: one run per mode. Warm: {args.repeats} runs per mode, interleaved; 'later epochs' pools "
              f"epochs 2-{args.epochs} of every warm run, median [min–max]. Graphs: dynamo's unique_graphs counter of "
              "the cold run (the full batch of 32 and the last batch of 30 are two shapes; validation runs eager)."]
    (out / "compile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
