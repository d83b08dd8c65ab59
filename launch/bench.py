"""`make bench`: train.py against a bare loop doing the same work, measured side by side in one run.

    python -m launch.bench [--out reports/bench] [--repeats 9] [--device cpu|cuda]

Four cases (launch/bench_worker.py) time train.py and the bare loop with its per-epoch validation in one process (or
one torchrun job at world 2), alternating block by block within each run of train.py, so that each block of one is
timed next to blocks of the other; a drift probe measures how far the machine's speed moves meanwhile. The thread
study runs train.py as fresh processes at 1 thread, at every core and at its default, on an idle machine and under a
competing load of one busy process per core. End to end times make overfit's command against the floor (import
torch, one optimizer step). Last, torch's SummaryWriter and spine's EventFile write the same batch of TensorBoard
events side by side (launch/bench_events.py), and torch's per-tensor optimizer update runs beside the foreach one
that build_optimizer asks for (launch/bench_update.py). Writes <out>/bench.md (the table, targets and misses) and
<out>/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from launch.bench_events import compare as compare_event_writers
from launch.bench_table import DRIFT_MIN_CHUNKS, build_table
from launch.bench_update import compare as compare_updates
from launch.bench_worker import CASES, THREAD_CASES
from launch.runner import ROOT, TORCHRUN
from spine.distributed import cores_per_rank

# A process that imports torch and takes one Adam step: what any training run pays before its first epoch.
FLOOR = ("import torch; m = torch.nn.Linear(2, 2); o = torch.optim.Adam(m.parameters()); "
         "m(torch.zeros(1, 2)).sum().backward(); o.step()")
OVERFIT = ["train.py", "--run-name", "overfit", "--overwrite", "--print-every", "10"]  # make overfit's command


def run_cases(cases: list[str], repeats: int, results: Path, device: str, epochs: str) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    for name in cases:
        case = CASES[name]
        print(f"bench: {case.label}", flush=True)
        worker = ["-m", "launch.bench_worker", "--case", name, "--out", str(results), "--repeats", str(repeats),
                  "--device", device] + (["--epochs", epochs] if epochs else [])
        launcher = [sys.executable] if case.world == 1 else [TORCHRUN, "--standalone",
                                                             f"--nproc_per_node={case.world}"]
        subprocess.run(launcher + worker, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)


@contextmanager
def competing_load(processes: int):
    """One busy Python process per core for the duration: the shared machine the thread default must survive."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        time.sleep(0.5)
        yield
    finally:
        for p in busy:
            p.kill()
            p.wait(timeout=10)


def thread_study(repeats: int, results: Path, device: str) -> None:
    """train.py as a fresh process at 1 thread, at every core, and at its default (--threads 0), per case and load:
    seconds per epoch from summary.json's loop_seconds."""
    cores = cores_per_rank(1)
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        for load in ("idle", "loaded"):
            with competing_load(cores if load == "loaded" else 0):
                for name, epochs in THREAD_CASES.items():
                    print(f"bench: threads, {name}, {load}", flush=True)
                    settings = [("1", 1), ("all", cores), ("default", 0)]
                    for repeat in range(repeats):
                        for label, threads in settings[repeat % 3:] + settings[:repeat % 3]:
                            cmd = [sys.executable, "train.py", *CASES[name].flags, "--epochs", str(epochs),
                                   "--threads", str(threads), "--device", device, "--runs-dir", f"{tmp}/runs",
                                   "--checkpoints-dir", f"{tmp}/ck", "--run-name", "t", "--overwrite",
                                   "--print-every", "1000000"]
                            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
                            summary = json.loads(Path(f"{tmp}/runs/t/summary.json").read_text())
                            row = {"case": name, "kind": f"threads {label}", "load": load, "repeat": repeat,
                                   "threads": summary["threads_per_rank"], "cores": cores,
                                   "seconds": summary["loop_seconds"] / epochs}
                            with open(results, "a") as f:
                                f.write(json.dumps(row) + "\n")


def end_to_end(repeats: int, results: Path) -> None:
    """Wall time of make overfit's command and of the floor, interleaved, as fresh processes."""
    with tempfile.TemporaryDirectory(prefix="bench-overfit-") as tmp:
        overfit = [sys.executable, *OVERFIT, "--runs-dir", f"{tmp}/runs", "--checkpoints-dir", f"{tmp}/ckpt"]
        kinds = [("make overfit", overfit), ("floor", [sys.executable, "-c", FLOOR])]
        print(f"bench: end to end, {repeats} x (make overfit's command, floor)", flush=True)
        # As on a default Python, the repo's modules load from bytecode written by an earlier run (some machines,
        # this one included, set PYTHONDONTWRITEBYTECODE, and every run would compile them again: ~25 ms).
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        for _, cmd in kinds:  # untimed: writes that bytecode
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env=env)
        for repeat in range(repeats):
            for kind, cmd in kinds[repeat % 2:] + kinds[:repeat % 2]:
                t = time.perf_counter()
                subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env=env)
                row = {"case": "end to end", "kind": kind, "repeat": repeat, "seconds": time.perf_counter() - t}
                with open(results, "a") as f:
                    f.write(json.dumps(row) + "\n")


def drift(seconds: float, results: Path, device: str) -> None:
    """The machine's speed over `seconds`, in chunks of 25 bare steps of the 20,000-sample case (launch/bench_loops.py,
    speed_drift): the noise every side-by-side comparison here has to beat."""
    import torch

    from launch.bench_loops import build_problem, speed_drift
    from spine.config import parse_config

    torch.set_num_threads(1)
    cfg = parse_config([*CASES["rule20k"].flags, "--device", device], world_size=1)
    data, model, optimizer = build_problem(cfg, torch.device(device))
    speed_drift(model, optimizer, data, cfg.batch_size, 0.5)  # warm-up
    per_step = speed_drift(model, optimizer, data, cfg.batch_size, seconds, min_chunks=DRIFT_MIN_CHUNKS)
    with open(results, "a") as f:
        f.writelines(json.dumps({"case": "drift", "kind": "bare steps", "repeat": i, "seconds": s}) + "\n"
                     for i, s in enumerate(per_step))


def machine() -> dict:
    import psutil
    import torch

    return {"cores": f"{psutil.cpu_count(logical=False)} physical / {psutil.cpu_count()} logical",
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only, gloo)"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/bench")
    p.add_argument("--repeats", type=int, default=9,
                   help="runs of train.py per case and kind, each alternating with the bare loop")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cuda: train.py against a bare CUDA loop (nccl at world 2)")
    p.add_argument("--thread-repeats", type=int, default=5)
    p.add_argument("--end-to-end-repeats", type=int, default=9)
    p.add_argument("--event-repeats", type=int, default=9, help="TensorBoard writers side by side (0: skip)")
    p.add_argument("--update-repeats", type=int, default=9,
                   help="the optimizer update, per-tensor against foreach, side by side (0: skip)")
    p.add_argument("--drift-seconds", type=float, default=10.0, help="the speed drift probe's length (0: skip)")
    p.add_argument("--epochs", default="",
                   help="epochs per run for every case, a multiple of every case's block (tests only)")
    opts = p.parse_args()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    results.unlink(missing_ok=True)
    cases = [c for c in opts.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        p.error(f"unknown case(s) {sorted(unknown)}; choose from {', '.join(CASES)}")

    load_start, t0 = os.getloadavg(), time.perf_counter()
    if opts.drift_seconds:
        print(f"bench: the machine's speed drift over {opts.drift_seconds:g} s", flush=True)
        drift(opts.drift_seconds, results, opts.device)
    run_cases(cases, opts.repeats, results, opts.device, opts.epochs)
    if opts.thread_repeats and opts.device == "cpu":
        thread_study(opts.thread_repeats, results, opts.device)
    if opts.end_to_end_repeats:
        end_to_end(opts.end_to_end_repeats, results)
    if opts.event_repeats:
        print("bench: TensorBoard events, SummaryWriter against EventFile", flush=True)
        with open(results, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in compare_event_writers(opts.event_repeats, 100))
    if opts.update_repeats and opts.device == "cpu":
        print("bench: the optimizer update, per-tensor against foreach", flush=True)
        with open(results, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in compare_updates(opts.update_repeats, 200))
    load_end = os.getloadavg()

    rows = [json.loads(line) for line in results.read_text().splitlines() if line]
    info = machine()
    command = "make bench  (" + " ".join(["python", "-m", "launch.bench", *map(shlex.quote, sys.argv[1:])]) + ")"
    header = [
        f"Machine: {info['cores']} cores ({info['cpu']}), GPU {info['gpu']}; torch {info['torch']}, "
        f"Python {info['python']}; device {opts.device}.",
        f"Load average (1/5/15 min) at start {' / '.join(f'{v:.2f}' for v in load_start)}, at end "
        f"{' / '.join(f'{v:.2f}' for v in load_end)}; the benchmark took {time.perf_counter() - t0:.0f} s.",
        f"Command: `{command}`; {opts.repeats} runs of train.py per case and kind, {opts.thread_repeats} per thread "
        f"setting, {opts.end_to_end_repeats} end to end, {opts.event_repeats} per TensorBoard writer, "
        f"{opts.update_repeats} per optimizer update, {opts.drift_seconds:g} s of drift probe.",
        "",
    ]
    text = "\n".join(header) + build_table(rows, cases) + "\n"
    (out / "bench.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
