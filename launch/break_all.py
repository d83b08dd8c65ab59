"""make break: a baseline and every deliberate bug under the same seed and configuration.

    python launch/break_all.py [--out reports/break] [--only NAME ...]

World-1 breaks run in this process; the distributed ones (and a world-2 baseline)
run under `torchrun --standalone --nproc_per_node=2`. Writes reports/break/break.md
(the comparison table), one overlay figure per break against its baseline, and
results.json. A diverged run is an expected outcome here, not a failure: the exit
code is non-zero only if a run fails for another reason or a break does not show
the symptom it is expected to show.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spine.experiment import RunRecord, run_in_process  # noqa: E402

# Dropout makes train/eval mode matter; SGD makes the loss scale and the lr visible (Adam normalises both
# away); 405 samples give 81 validation samples, an odd count, so DistributedSampler must pad at world 2;
# the training set is stored sorted by class so that a missing shuffle shows.
BASE = ["--dataset", "moons", "--n-samples", "405", "--noise", "0.1", "--dropout", "0.1",
        "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--epochs", "40", "--order", "sorted",
        "--seed", "0", "--checkpoint-every-epochs", "1000", "--print-every", "1000", "--log-every", "1000"]

# name -> (world size, extra flags, symptoms the harness must report)
BREAKS: dict[str, tuple[int, list[str], set[str]]] = {
    "baseline": (1, [], set()),
    "no-train-mode": (1, ["--break", "no-train-mode"], {"trained-in-eval-mode"}),
    "no-eval-mode": (1, ["--break", "no-eval-mode"], {"validated-in-train-mode", "val-mismatch"}),
    "huge-lr": (1, ["--break", "huge-lr"], {"diverged"}),
    "no-zero-grad": (1, ["--break", "no-zero-grad"], {"diverged"}),
    "no-shuffle": (1, ["--break", "no-shuffle"], {"repeated-order", "loss-spike"}),
    "no-shuffle, random storage": (1, ["--break", "no-shuffle", "--order", "random"], {"repeated-order"}),
    "no-set-epoch": (1, ["--break", "no-set-epoch"], {"repeated-order"}),
    "sum-loss": (1, ["--break", "sum-loss"], {"oscillation"}),
    "softmax-logits": (1, ["--break", "softmax-logits"], {"plateau"}),
    "baseline, world 2": (2, ["--global-batch-size", "32"], set()),
    "no-distributed-sampler": (2, ["--global-batch-size", "32", "--break", "no-distributed-sampler"],
                               {"overlapping-shards"}),
    "no-grad-sync": (2, ["--global-batch-size", "32", "--break", "no-grad-sync"], {"replicas-diverged"}),
    "rank0-val": (2, ["--global-batch-size", "32", "--break", "rank0-val"], {"val-mismatch"}),
    "padded-val": (2, ["--global-batch-size", "32", "--break", "padded-val"], {"val-mismatch"}),
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).replace("--", "-").strip("-")


def run_one(name: str, world: int, flags: list[str], out: Path, tensorboard: bool) -> RunRecord:
    args = BASE + flags + ([] if tensorboard else ["--no-tensorboard"])
    if world == 1:
        return run_in_process(args, out, slug(name))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    full = [torchrun, "--standalone", f"--nproc_per_node={world}", str(ROOT / "train.py"), *args,
            "--runs-dir", str(out / "runs"), "--checkpoints-dir", str(out / "checkpoints"),
            "--run-name", slug(name), "--overwrite"]
    proc = subprocess.run(full, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return RunRecord.from_dir(slug(name), args, proc.returncode, out / "runs" / slug(name), proc.stdout + proc.stderr)


def row(name: str, r: RunRecord, expected: set[str]) -> str:
    s, f = r.summary, r.summary.get("final") or {}
    got = set(s.get("symptoms", []))
    verdict = "yes" if expected <= got and (expected or not got) else "**NO**"
    return (f"| {name} | {_num(f.get('train_loss'))} | {_pct(f.get('train_acc'))} | {_num(f.get('val_loss'))} "
            f"| {_pct(f.get('val_acc'))} | {s.get('epochs_to_100_train_acc') or '—'} "
            f"| {'yes' if s.get('diverged') else 'no'} | {', '.join(sorted(got)) or '—'} | {verdict} |")


def overlay(name: str, run: RunRecord, base: RunRecord, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key in zip(axes, ("train_loss", "val_loss"), strict=True):
        for label, r, style in (("baseline", base, "-"), (name, run, "-")):
            ys = [v if v is not None and math.isfinite(v) and v < 1e6 else float("nan") for v in r.curve(key)]
            ax.plot(range(1, len(ys) + 1), ys, style, label=label)
        ax.set_yscale("log")
        ax.set(xlabel="epoch", ylabel=key.replace("_", " ") + " (log)")
        ax.legend(fontsize=8)
    fig.suptitle(f"--break {name} vs baseline (symptoms: {', '.join(run.summary.get('symptoms', [])) or 'none'})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/break")
    p.add_argument("--only", nargs="*", help="run just these (names as in the table); baselines always run")
    p.add_argument("--no-tensorboard", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in BREAKS if not args.only or n in args.only or n.startswith("baseline")]
    runs: dict[str, RunRecord] = {}
    for name in names:
        world, flags, _ = BREAKS[name]
        runs[name] = run_one(name, world, flags, out / "break-runs", not args.no_tensorboard)
        print(f"{name:28s} exit {runs[name].returncode}  symptoms: {runs[name].summary.get('symptoms')}", flush=True)
    lines = ["| run | final train loss | train acc | final val loss | val acc | epochs to 100% train acc "
             "| diverged | symptoms seen | expected symptoms seen |", "|---|---:|---:|---:|---:|---:|---|---|---|"]
    ok = True
    for name in names:
        world, _, expected = BREAKS[name]
        r = runs[name]
        lines.append(row(name, r, expected))
        crashed = r.returncode not in (0, 3) or not r.summary
        ok = ok and not crashed and expected <= set(r.summary.get("symptoms", []))
        ok = ok and (bool(expected) or not r.summary.get("symptoms"))
        if not name.startswith("baseline") and not crashed:
            base = runs["baseline" if world == 1 else "baseline, world 2"]
            overlay(name, r, base, out / f"{slug(name)}.png")
    text = ("Every deliberate bug against its baseline, same seed and configuration. "
            "Regenerate with `make break`.\n\n" + "\n".join(lines) + "\n")
    (out / "break.md").write_text(text)
    (out / "results.json").write_text(json.dumps(
        {n: {"summary": r.summary, "returncode": r.returncode, "expected": sorted(BREAKS[n][2])}
         for n, r in runs.items()}, indent=1, default=str))
    print(text)
    return 0 if ok else 1


def _num(v) -> str:
    return "—" if v is None else f"{v:.3g}"


def _pct(v) -> str:
    return "—" if v is None else f"{v:.1%}"


if __name__ == "__main__":
    sys.exit(main())
