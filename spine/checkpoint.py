"""Atomic, weights-only checkpoints and the RNG state that makes a resume exact.

Layout of <checkpoints-dir>/<run-name>/:
  step-00000123.pt   one file per save, the newest `keep` kept
  last.pt            hard link to the newest step file (what --resume auto reads first)
  best.pt            lowest validation loss so far
"""

from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path

import torch

from data import SplitDataset, build_dataset
from models import build_model
from spine import faults
from spine.config import Config
from spine.errors import TrainingError, UsageError

STEP_FILE = re.compile(r"^step-(\d{8})\.pt$")
FORMAT = 2  # 2: config keyed by flag name, TrainState under "progress"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(obj: dict, path: Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`.

    A crash at any point leaves either the old file or the new one, never a torn one.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            faults.during_checkpoint_write(f, path)  # SPINE_FAULT tear-checkpoint / disk-full; no-op when unset
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _link_atomic(target: Path, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.link(target, tmp)
    os.replace(tmp, link)


def step_files(folder: Path) -> list[Path]:
    """Step checkpoints, oldest first. Temp files of a crashed write never match."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if STEP_FILE.match(p.name))


def clean_temp_files(folder: Path) -> list[Path]:
    """Remove leftovers of writes that crashed half-way (call only while no other process writes here)."""
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".") and ".tmp-" in p.name:
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def save_checkpoint(state: dict, folder: Path, global_step: int, keep: int, best: bool = False) -> Path:
    """Save one step checkpoint, point last.pt at it, prune to the newest `keep`.

    A failed write (disk full, folder gone or read-only) raises TrainingError naming the file; the
    checkpoints written before it are untouched, because nothing is pruned or relinked until the new
    file is complete.
    """
    path = folder / f"step-{global_step:08d}.pt"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_atomic(state, path)
        _link_atomic(path, folder / "last.pt")
        if best:
            _link_atomic(path, folder / "best.pt")
        for old in step_files(folder)[:-keep]:
            old.unlink(missing_ok=True)
        _fsync_dir(folder)
    except OSError as e:
        raise TrainingError(f"could not write checkpoint {path}: {e.strerror or e}; "
                            "the checkpoints saved before it are intact") from None
    return path


def ensure_writable(folder: Path, flag: str) -> None:
    """Refuse an output folder that cannot be created or written, before any training is spent.

    Checks the folder, or its nearest existing ancestor when it does not exist yet, without writing.
    """
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{flag}: cannot create {folder}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: {probe} is not writable, so {folder} cannot be written")


def load_checkpoint(path: Path) -> dict:
    """Load with weights_only=True: a file whose unpickling would run code is refused, its code never run."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainingError(f"checkpoint {path} does not exist") from None
    except PermissionError:
        raise TrainingError(f"checkpoint {path} is not readable (permission denied)") from None
    except IsADirectoryError:
        raise TrainingError(f"checkpoint {path} is a directory, not a file") from None
    except pickle.UnpicklingError as e:  # a global outside the weights-only allow-list: refused before it runs
        raise TrainingError(f"checkpoint {path} refused: not a weights-only file ({_weights_only_reason(e)}); "
                            "the load stopped before any of it could run") from None
    except Exception as e:  # truncated or damaged zip archive, empty file
        raise TrainingError(f"checkpoint {path} is corrupt or truncated: {_first_sentence(e)}") from None
    if not isinstance(state, dict) or "model" not in state or "progress" not in state:
        raise TrainingError(f"checkpoint {path} is not a checkpoint written by train.py")
    if state.get("format") != FORMAT:
        raise TrainingError(f"checkpoint {path} was written by an older train.py (format {state.get('format', 1)}, "
                            f"this one reads {FORMAT}); start a new run")
    return state


def _first_sentence(error: Exception | str) -> str:
    """torch's loader errors run to paragraphs; the first sentence names the problem."""
    text = " ".join(str(error).split())
    if not text:
        return f"{type(error).__name__} (empty or cut-off file)"
    return text.split(". ")[0].rstrip(".")


def _weights_only_reason(error: Exception) -> str:
    _, found, detail = str(error).partition("WeightsUnpickler error:")
    lines = [line for line in detail.splitlines() if line.strip()]
    return _first_sentence(lines[0]) if found and lines else "content outside the weights-only allow-list"


def load_latest(folder: Path, say=print) -> tuple[dict, Path] | None:
    """The newest complete checkpoint that loads, or None when the folder holds none.

    last.pt is read first, except when a crash between the rename of a new step file and the relink
    left that step file newer than last.pt. A corrupt file is reported and skipped, so one torn or
    damaged file costs the steps since the previous save, not the run; when checkpoints exist but
    none loads, that is an error (starting fresh would overwrite them).
    """
    steps = list(reversed(step_files(folder)))
    last = folder / "last.pt"
    candidates = steps
    if last.exists():
        same = [p for p in steps if os.path.samefile(p, last)]
        newer = steps[:steps.index(same[0])] if same else []
        candidates = newer + [last] + [p for p in steps if p not in newer and p not in same]
    tried = []
    for path in candidates:
        try:
            return load_checkpoint(path), path
        except TrainingError as e:
            tried.append(path.name)
            say(f"warning: {e}; falling back to an older checkpoint")
    if tried:
        raise TrainingError(f"no readable checkpoint in {folder} (tried {', '.join(tried)}); "
                            "move the folder away to start fresh, or pass --resume PATH")
    return None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(_python_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _python_state() -> tuple:
    version, internal, gauss = random.getstate()
    return version, list(internal), gauss


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# Config keys (flag names) that must match for a resume to continue the same run.
MUST_MATCH = (
    "dataset", "n-samples", "val-fraction", "noise", "dim", "classes", "data-seed", "order", "limit-samples",
    "model", "hidden", "activation", "dropout", "batchnorm", "optimizer", "seed", "break",
)
# Restored with the optimizer and scheduler state: a new value on the command line would not take effect, so a
# change is refused rather than printed in the header and silently ignored.
OPTIMIZER_KEYS = ("lr", "momentum", "weight-decay", "schedule", "warmup-steps")


def check_compatible(state: dict, config: dict, fingerprint: str, world_size: int) -> None:
    """Refuse a checkpoint from another model, dataset, optimizer setting or global batch, naming what differs.

    What may change: --epochs (under a constant schedule), the world size and accumulation count at the same global
    batch (also from a mid-epoch checkpoint: the global batch fixes which samples each step covers), logging and
    checkpoint cadence, output folders, --grad-clip.
    """
    saved = state["config"]
    for key in MUST_MATCH + OPTIMIZER_KEYS:
        if saved.get(key) != config.get(key):
            why = (": the restored optimizer and schedule keep the checkpoint's value; resume with it, or start a new "
                   "run" if key in OPTIMIZER_KEYS else "")
            raise UsageError(f"--resume: checkpoint has --{key} {saved.get(key)}, this run has --{key} "
                             f"{config.get(key)}{why}")
    if config["schedule"] != "constant" and saved["epochs"] != config["epochs"]:
        raise UsageError(f"--resume: checkpoint has --epochs {saved['epochs']} under --schedule {config['schedule']}, "
                         f"this run has --epochs {config['epochs']}: the schedule's length would change; resume with "
                         f"--epochs {saved['epochs']}, or start a new run")
    if state["dataset_fingerprint"] != fingerprint:
        raise UsageError(
            f"--resume: checkpoint was trained on dataset {state['dataset_fingerprint']}, this run built {fingerprint}"
        )
    # The global batch must match; how it is reached (ranks x micro-batch x accumulation steps) may change.
    saved_global = saved["batch-size"] * saved["grad-accum-steps"] * state["world_size"]
    this_global = config["batch-size"] * config["grad-accum-steps"] * world_size
    if saved_global != this_global:
        raise UsageError(f"--resume: checkpoint used a global batch of {saved_global}, this run {this_global}")


def load_for_eval(path: Path) -> tuple[torch.nn.Module, Config, SplitDataset, dict]:
    """Rebuild a checkpoint's model (in eval mode) and its dataset from the config inside it: (model, config, data,
    the whole checkpoint). Raises TrainingError for a file that does not load."""
    state = load_checkpoint(path)
    cfg = Config.from_dict(state["config"])
    data = build_dataset(cfg.dataset, cfg.n_samples, cfg.val_fraction, cfg.noise, cfg.dim, cfg.classes,
                         cfg.data_seed, cfg.order)
    model = build_model(cfg.model, data.input_shape, data.num_classes, cfg.hidden, cfg.activation, cfg.dropout,
                        cfg.batchnorm)
    model.load_state_dict(state["model"])
    return model.eval(), cfg, data, state
