"""make break: a baseline and every deliberate mistake of spine/breaks.py under the same seed and configuration.

    python -m launch.break_all [--out reports/break] [--only NAME ...]

World-1 runs go in this process; the distributed ones (and a world-2 baseline) run in one torchrun job of two
ranks. Writes break.md (the comparison table), one overlay figure per mistake against its baseline, and
results.json. A diverged run is an expected outcome here, not a failure: the exit code is non-zero only if a
run fails for another reason or a mistake does not show the symptoms the registry expects of it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from launch import figures
from launch.runner import RunRecord, run_many
from spine.breaks import BREAKS

# Dropout makes train/eval mode matter; SGD makes the loss scale and the lr visible (Adam normalises both
# away); 405 samples give 81 validation samples, an odd count, so DistributedSampler must pad at world 2;
# the training set is stored sorted by class so that a missing shuffle shows.
BASE = ["--dataset", "moons", "--n-samples", "405", "--noise", "0.1", "--dropout", "0.1",
        "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--epochs", "40", "--order", "sorted",
        "--seed", "0", "--checkpoint-every-epochs", "1000", "--print-every", "1000", "--log-every", "1000"]
WORLD2 = ["--global-batch-size", "32"]


def experiments() -> dict[str, tuple[int, list[str], frozenset[str]]]:
    """name -> (world size, flags beyond BASE, symptoms the harness must report), in the table's order."""
    table: dict[str, tuple[int, list[str], frozenset[str]]] = {}
    for world in (1, 2):
        table["baseline" if world == 1 else "baseline, world 2"] = (world, [] if world == 1 else WORLD2, frozenset())
        for m in (m for m in BREAKS.values() if m.ranks == world):
            flags = ([] if world == 1 else WORLD2) + ["--break", m.name]
            table[m.name] = (world, flags, m.symptoms)
            for v in m.variants:
                table[f"{m.name}, {v.label}"] = (world, flags + list(v.flags), v.symptoms)
    return table


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).replace("--", "-").strip("-")


def row(name: str, r: RunRecord, expected: frozenset[str]) -> str:
    s, f = r.summary, r.summary.get("final") or {}
    got = set(s.get("symptoms", []))
    verdict = "yes" if expected <= got and (expected or not got) else "**NO**"
    return (f"| {name} | {_num(f.get('train_loss'))} | {_pct(f.get('train_acc'))} | {_num(f.get('val_loss'))} "
            f"| {_pct(f.get('val_acc'))} | {s.get('epochs_to_100_train_acc') or '—'} "
            f"| {'yes' if s.get('diverged') else 'no'} | {', '.join(sorted(got)) or '—'} | {verdict} |")


def overlay(name: str, run: RunRecord, base: RunRecord, path: Path) -> None:
    fig, axes = figures.panels(2)
    for ax, key in zip(axes, ("train_loss", "val_loss"), strict=True):
        for label, r in (("baseline", base), (name, run)):
            ys = figures.finite(r.curve(key), ceiling=1e6)
            ax.plot(range(1, len(ys) + 1), ys, label=label)
        ax.set_yscale("log")
        ax.set(xlabel="epoch", ylabel=key.replace("_", " ") + " (log)")
        ax.legend(fontsize=8)
    figures.save(fig, path, f"--break {name} vs baseline (symptoms: "
                 f"{', '.join(run.summary.get('symptoms', [])) or 'none'})", "make break")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/break")
    p.add_argument("--only", nargs="*", help="run just these (names as in the table); baselines always run")
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--epochs", type=int, default=40, help="epochs of every run (the tests use fewer)")
    p.add_argument("--figures", nargs="*", help="draw only these runs' overlays (default: all; ~0.5 s each)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = experiments()
    names = [n for n in table if not args.only or n in args.only or n.startswith("baseline")]
    extra = (["--no-tensorboard"] if args.no_tensorboard else []) + ["--epochs", str(args.epochs)]
    runs: dict[str, RunRecord] = {}
    for world in (1, 2):
        chosen = [n for n in names if table[n][0] == world]
        done = run_many([(BASE + table[n][1] + extra, slug(n)) for n in chosen], out / "break-runs", world)
        runs.update(zip(chosen, done, strict=True))
    lines = ["| run | final train loss | train acc | final val loss | val acc | epochs to 100% train acc "
             "| diverged | symptoms seen | expected symptoms seen |", "|---|---:|---:|---:|---:|---:|---|---|---|"]
    ok = True
    for name in names:
        world, _, expected = table[name]
        r = runs[name]
        print(f"{name:28s} exit {r.returncode}  symptoms: {r.summary.get('symptoms')}", flush=True)
        lines.append(row(name, r, expected))
        crashed = r.returncode not in (0, 3) or not r.summary
        ok = ok and not crashed and expected <= set(r.summary.get("symptoms", []))
        ok = ok and (bool(expected) or not r.summary.get("symptoms"))
        if not name.startswith("baseline") and not crashed and (args.figures is None or name in args.figures):
            overlay(name, r, runs["baseline" if world == 1 else "baseline, world 2"], out / f"{slug(name)}.png")
    text = ("Every deliberate bug against its baseline, same seed and configuration. "
            "Regenerate with `make break`.\n\n" + "\n".join(lines) + "\n")
    (out / "break.md").write_text(text)
    (out / "results.json").write_text(json.dumps(
        {n: {"summary": r.summary, "returncode": r.returncode, "expected": sorted(table[n][2])}
         for n, r in runs.items()}, indent=1, default=str))
    print(text)
    return 0 if ok else 1


def _num(v) -> str:
    return "—" if v is None else f"{v:.3g}"


def _pct(v) -> str:
    return "—" if v is None else f"{v:.1%}"


if __name__ == "__main__":
    sys.exit(main())
