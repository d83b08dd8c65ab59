"""Command line and --config FILE.toml -> a frozen, validated Config.

Each flag is declared once, as a field of `Config`: its default, its --help group and text, and its own check.
The parser, the TOML reader, the TOML writer and the per-flag validation all derive from those declarations;
only the rules that relate two flags are written out, in `_cross_checks`. Keys (in a config file, summary.json
and checkpoints) are the flag names without the leading dashes: `batch-size`, `break`, `tensorboard`.

Validation happens before anything touches the disk or the network, so bad input costs nothing: one line
naming the flag (or the file and key), exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from data import DATASETS, REAL_DATASETS, dataset_layout, dataset_shape, is_dataset_name, npz_path, short_name
from models import MODELS
from spine.breaks import BREAKS
from spine.errors import UsageError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")

Check = tuple[Callable[[Any], bool], str]  # (is the value acceptable?, what it must be, for the error message)


def _finite(v: float) -> bool:
    return math.isfinite(v)


POSITIVE: Check = (lambda v: v > 0, "must be positive")
NON_NEGATIVE: Check = (lambda v: v >= 0, "must be >= 0")
OFF_OR_MORE: Check = (lambda v: v >= 0, "must be >= 0 (0 = off)")
AT_LEAST_ONE: Check = (lambda v: v is None or v >= 1, "must be at least 1 (leave it out for off)")


def flag(default: Any, group: str, help: str, *, check: Check | None = None,
         choices: Callable[[], tuple[str, ...]] | tuple[str, ...] | None = None, noun: str = "",
         name: str = "", metavar: str | None = None, hparam: bool = False) -> Any:
    """Declare one flag: a dataclass field whose metadata drives the parser, the TOML reader and validation.
    `hparam`: a hyperparameter a user varies between runs, a column of TensorBoard's HParams dashboard."""
    return field(default=default, metadata={"group": group, "help": help, "check": check, "choices": choices,
                                            "noun": noun, "name": name, "metavar": metavar, "hparam": hparam})


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = flag("moons", "data", "the dataset: a synthetic one (" + ", ".join(DATASETS) + "), digits "
                        "(scikit-learn's 8x8 images) or npz:PATH (your arrays x, y or x_train, y_train, x_val, y_val)",
                        check=(is_dataset_name, "must be one of " + ", ".join((*DATASETS, *REAL_DATASETS))),
                        hparam=True)
    n_samples: int = flag(200, "data", "total samples, train + validation (synthetic datasets)",
                          check=(lambda v: v >= 2, "must be at least 2"), hparam=True)
    val_fraction: float = flag(0.2, "data", "share held out for validation, in (0, 1)",
                               check=(lambda v: 0 < v < 1, "must lie in (0, 1)"))
    noise: float = flag(0.1, "data", "noise level of the generator (>= 0)",
                        check=(lambda v: _finite(v) and v >= 0, "must be >= 0"), hparam=True)
    dim: int = flag(2, "data", "input dimensions (rule dataset only)", check=POSITIVE)
    classes: int = flag(2, "data", "number of classes (rule dataset only)",
                        check=(lambda v: v >= 2, "must be at least 2"))
    data_seed: int = flag(0, "data", "seed of the data generator, independent of --seed", hparam=True)
    order: str = flag("random", "data", "storage order of the training set: sorted groups it by class",
                      choices=("random", "sorted"))
    limit_samples: int = flag(0, "data", "train on only the first N training samples (the single-batch overfit "
                              "check); 0 = all", check=(lambda v: v >= 0, "must be >= 0 (0 = all)"))
    # model
    model: str = flag("mlp", "model", "the model", choices=lambda: tuple(MODELS), hparam=True)
    hidden: tuple[int, ...] = flag((64, 64), "model", "hidden widths, comma-separated, e.g. 64,64", hparam=True)
    activation: str = flag("relu", "model", "activation after each hidden layer", choices=("relu", "tanh", "gelu"),
                           hparam=True)
    dropout: float = flag(0.0, "model", "dropout probability after each hidden layer, in [0, 1)",
                          check=(lambda v: 0 <= v < 1, "must lie in [0, 1)"), hparam=True)
    batchnorm: bool = flag(False, "model", "BatchNorm after each hidden layer (BatchNorm1d in the MLP, BatchNorm2d "
                           "after each conv of the CNN)", hparam=True)
    sync_batchnorm: bool = flag(False, "model", "with --batchnorm under DDP, normalise with the statistics of the "
                                "global batch (torch.nn.SyncBatchNorm; GPU only: torch refuses it on CPU modules)")
    # optimisation
    optimizer: str = flag("adam", "optimisation", "the optimizer", choices=OPTIMIZERS, hparam=True)
    lr: float = flag(0.01, "optimisation", "peak learning rate (> 0)",
                     check=(lambda v: _finite(v) and v > 0, "must be a positive number"), hparam=True)
    momentum: float = flag(0.0, "optimisation", "SGD momentum, in [0, 1)",
                           check=(lambda v: 0 <= v < 1, "must lie in [0, 1)"), hparam=True)
    weight_decay: float = flag(0.0, "optimisation", "L2 (SGD, Adam) or decoupled (AdamW) weight decay",
                               check=NON_NEGATIVE, hparam=True)
    schedule: str = flag("constant", "optimisation", "learning-rate schedule after warmup", choices=SCHEDULES,
                         hparam=True)
    warmup_steps: int = flag(0, "optimisation", "linear warmup from 0 to --lr over this many steps",
                             check=NON_NEGATIVE, hparam=True)
    grad_clip: float = flag(0.0, "optimisation", "clip the global grad norm to this value; 0 = off (the norm is "
                            "logged either way)", check=OFF_OR_MORE, hparam=True)
    epochs: int = flag(100, "optimisation", "total epochs; a resume continues up to this number", check=POSITIVE,
                       hparam=True)
    batch_size: int = flag(32, "optimisation", "samples per rank per micro-batch", check=POSITIVE, hparam=True)
    global_batch_size: int = flag(0, "optimisation", "samples per optimizer step over all ranks (instead of "
                                  "--batch-size): per-rank batch x world size x --grad-accum-steps, so it must "
                                  "divide by their product; 0 = use --batch-size", check=NON_NEGATIVE)
    grad_accum_steps: int = flag(1, "optimisation", "micro-batches of --batch-size per optimizer step on each "
                                 "rank; gradients add up locally (DDP's no_sync) and are all-reduced once, on the "
                                 "last", check=(lambda v: v >= 1, "must be at least 1"), hparam=True)
    eval_batch_size: int = flag(4096, "optimisation", "samples per validation forward", check=POSITIVE)
    target_loss: float = flag(1e-3, "optimisation", "report the first epoch and step at which the epoch's train "
                              "loss is <= this", check=POSITIVE)
    seed: int = flag(0, "optimisation", "seed of initialisation, shuffling and dropout", hparam=True)
    break_: str = flag("", "optimisation", "inject one deliberate mistake (make break)", name="break",
                       choices=lambda: ("",) + tuple(BREAKS), noun="mistake", metavar="NAME", hparam=True)
    # system
    device: str = flag("auto", "system", "auto = cuda when available; the backend follows (nccl on cuda, gloo on "
                       "cpu)", choices=("auto", "cpu", "cuda"))
    threads: int = flag(0, "system", "CPU threads per rank; 0 = automatic: 1 for a small step, else the rank's share "
                        "of the node's physical cores (alone on the node: the idle ones, sampled at start)",
                        check=(lambda v: v >= 0, "must be >= 0 (0 = automatic)"))
    precision: str = flag("fp32", "system", "fp32, or bf16 / fp16 through torch.autocast (fp16 with a GradScaler)",
                          choices=PRECISIONS)
    compile: bool = flag(False, "system", "torch.compile the model for training (validation stays eager)")
    pg_timeout: float = flag(120.0, "system", "seconds a collective may wait for a lost rank before failing",
                             check=(lambda v: _finite(v) and v > 0, "must be positive"))
    # outputs
    run_name: str = flag("", "outputs", "name of the run; default <dataset>-<model>-seed<seed>")
    runs_dir: str = flag("runs", "outputs", "TensorBoard logs, metrics.jsonl, summary.json and config.toml go to "
                         "<runs-dir>/<run-name>/")
    checkpoints_dir: str = flag("checkpoints", "outputs", "checkpoints go to <checkpoints-dir>/<run-name>/")
    resume: str = flag("", "outputs", "'auto' = continue from the run's newest checkpoint if there is one, else "
                       "start fresh; or a checkpoint path")
    overwrite: bool = flag(False, "outputs", "replace an existing run of the same name instead of refusing")
    checkpoint_every_steps: int = flag(0, "outputs", "also save every N optimizer steps; 0 = only at epoch ends",
                                       check=NON_NEGATIVE)
    checkpoint_every_epochs: int = flag(0, "outputs", "save every N epochs; 0 = off. The final epoch is always "
                                        "saved; best.pt is the best of the saved checkpoints", check=OFF_OR_MORE)
    checkpoint_every_seconds: float = flag(60.0, "outputs", "save at the end of the first epoch at least this many "
                                           "seconds after the last save (rank 0's clock decides for all ranks); "
                                           "0 = off", check=(lambda v: _finite(v) and v >= 0, OFF_OR_MORE[1]))
    keep_checkpoints: int = flag(3, "outputs", "step checkpoints kept on disk (newest first); last.pt and best.pt "
                                 "point into them", check=POSITIVE)
    log_every: int = flag(10, "outputs", "every N steps: the grad norm, per-step scalars to TensorBoard and a "
                          "non-finite check; in long epochs also a console line, at most about one a second",
                          check=POSITIVE)
    print_every: int = flag(0, "outputs", "console line every N epochs; 0 = the first epoch, then about one a second "
                            "(the last is always printed)", check=NON_NEGATIVE)
    tensorboard: bool = flag(True, "outputs", "write TensorBoard event files")
    # instruments (spine/instruments/): each off unless asked for, except the live guards, which are always on
    layer_stats: bool = flag(False, "instruments", "every --log-every steps, per parameter: grad norm, weight norm "
                             "and update-to-weight ratio; per layer: activation mean/std and dead ReLU fraction "
                             "(TensorBoard, layers.*)")
    histograms_every: int | None = flag(None, "instruments", "every N epochs, TensorBoard histograms of the weights "
                                        "and gradients of the epoch's last step", check=AT_LEAST_ONE)
    sharpness_every: int | None = flag(None, "instruments", "every N steps (and before the first), the largest "
                                       "Hessian eigenvalue of the mean training loss, logged beside 2/lr",
                                       check=AT_LEAST_ONE)
    sharpness_samples: int = flag(1024, "instruments", "training samples (the first N; all when fewer) the "
                                  "sharpness is measured on", check=POSITIVE)
    noise_scale: bool = flag(False, "instruments", "the gradient noise scale B_simple (McCandlish et al. 2018), "
                             "from the per-rank and all-reduced gradients, or at world size 1 from the micro-batches "
                             "of --grad-accum-steps; measured on one step in --noise-scale-every")
    noise_scale_every: int | None = flag(None, "instruments", "with --noise-scale: measure one step in N (default: "
                                         "--log-every, whose steps compute the grad norm anyway; 1 = every step: "
                                         "a smoother estimate for more time)", check=AT_LEAST_ONE)
    lr_find: bool = flag(False, "instruments", "instead of training: an LR range test (Smith 2017) from a fresh "
                         "model; writes <runs-dir>/<run>/lr_find.png and prints a suggested lr; no checkpoint")
    lr_find_steps: int = flag(200, "instruments", "steps of the LR range test",
                              check=(lambda v: v >= 2, "must be at least 2"))
    lr_find_min: float = flag(1e-6, "instruments", "the LR range test's first lr",
                              check=(lambda v: _finite(v) and v > 0, "must be a positive number"))
    lr_find_max: float = flag(10.0, "instruments", "the LR range test's last lr",
                              check=(lambda v: _finite(v) and v > 0, "must be a positive number"))

    def to_dict(self) -> dict[str, Any]:
        """Keyed by flag name: what summary.json, checkpoints and config.toml record."""
        return {flag_name(f): list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in FIELDS}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Config:
        """The Config a checkpoint or summary recorded; unknown keys are ignored, missing ones take defaults."""
        values = {}
        for f in FIELDS:
            key = flag_name(f)
            if key in d:
                values[f.name] = tuple(d[key]) if f.type == "tuple[int, ...]" else d[key]
        return Config(**values)

    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run_name

    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoints_dir) / self.run_name


FIELDS = dataclasses.fields(Config)


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata["name"] or f.name.replace("_", "-")


BY_NAME = {flag_name(f): f for f in FIELDS}
# The hyperparameters a user varies, by flag name: what TensorBoard's HParams dashboard compares runs by.
HPARAMS = tuple(flag_name(f) for f in FIELDS if f.metadata["hparam"])


# --- parsing: command line and TOML ---------------------------------------------------------------------------


def _hidden(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(w <= 0 for w in widths):
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return widths


_PARSE = {"int": int, "int | None": int, "float": float, "str": str, "tuple[int, ...]": _hidden}


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we want just the error, one line."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    # SUPPRESS: a flag not given is absent from the result, so a --config file can supply it instead.
    p = _OneLineParser(
        prog="train.py", argument_default=argparse.SUPPRESS,
        description="Hand-written, DDP-aware training loop. Run with `python train.py` (one process) or "
                    "`torchrun --nproc_per_node=N train.py` (N ranks). Any flag can also come from --config "
                    "FILE.toml (keys are the flag names); flags on the command line win over the file.",
    )
    p.add_argument("--config", metavar="FILE.toml", help="read flags from a TOML file, e.g. a run's config.toml")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in FIELDS:
        meta, name = f.metadata, flag_name(f)
        group = groups.setdefault(meta["group"], p.add_argument_group(meta["group"]))
        shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        help_text = meta["help"] + (f" (default: {shown!s})" if shown not in ("", False, None) else "")
        choices = _choices(f)
        if choices:
            help_text += f"; one of: {', '.join(c for c in choices if c)}"
        if f.type == "bool":
            group.add_argument(f"--{name}", dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(f"--{name}", dest=f.name, type=_PARSE[f.type], help=help_text,
                               metavar=meta["metavar"] or name.replace("-", "_").upper())
    return p


def _choices(f: dataclasses.Field) -> tuple[str, ...] | None:
    choices = f.metadata["choices"]
    return choices() if callable(choices) else choices


def read_toml(path: str) -> dict[str, Any]:
    """Flag values from a TOML file, typed and checked against the declarations; UsageError names file and key."""
    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"--config {path}: is a directory, not a file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path}: cannot read it: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"--config {path}: not valid TOML: {e}") from None
    values = {}
    for key, value in table.items():
        f = BY_NAME.get(key)
        if f is None:
            raise UsageError(f"--config {path}: unknown key {key!r} (keys are the flag names, e.g. batch-size)")
        values[f.name] = _typed(f, value, f"--config {path}: key {key!r}")
    return values


def _typed(f: dataclasses.Field, value: Any, where: str) -> Any:
    if f.type == "bool":
        ok = isinstance(value, bool)
    elif f.type in ("int", "int | None"):  # TOML has no null: an absent key is None
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif f.type == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif f.type == "str":
        ok = isinstance(value, str)
    else:  # hidden widths: a list of positive integers, or the flag's own "64,64" text
        if isinstance(value, str):
            try:
                return _hidden(value)
            except argparse.ArgumentTypeError as e:
                raise UsageError(f"{where}: {e}") from None
        ok = isinstance(value, list) and all(isinstance(w, int) and not isinstance(w, bool) and w > 0
                                             for w in value)
        value = tuple(value) if ok else value
    if not ok:
        expected = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}
        raise UsageError(f"{where}: expected {expected.get(f.type, 'a list of positive integers')}, got {value!r}")
    return value


def to_toml(cfg: Config, comment: str = "") -> str:
    """The config as a TOML file that `--config` reads back to the same Config."""
    lines = [f"# {line}" for line in comment.splitlines()]
    for key, value in cfg.to_dict().items():
        if value is None:  # an optional flag left out; TOML has no null
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, float):
            text = repr(value)  # repr round-trips exactly; TOML reads 1e-05, inf and nan alike
        elif isinstance(value, list):
            text = "[" + ", ".join(map(str, value)) + "]"
        elif isinstance(value, int):
            text = str(value)
        else:
            text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def parse_config(argv: list[str] | None = None, world_size: int | None = None) -> Config:
    """Parse and validate: defaults, then --config FILE, then the command line. Raises UsageError (one line)."""
    given = vars(build_parser().parse_args(argv))
    values = read_toml(given.pop("config")) if "config" in given else {}
    values.update(given)
    cfg = Config(**values)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = _resolve_batch(cfg, world_size)
    validate(cfg, world_size)
    if not cfg.run_name:
        cfg = dataclasses.replace(cfg, run_name=f"{short_name(cfg.dataset)}-{cfg.model}-seed{cfg.seed}")
    return cfg


def _resolve_batch(cfg: Config, world_size: int) -> Config:
    """--global-batch-size G sets the per-rank micro-batch: G = batch_size x world_size x grad_accum_steps."""
    if cfg.global_batch_size:
        if cfg.grad_accum_steps < 1:
            raise UsageError(f"--grad-accum-steps must be at least 1, got {cfg.grad_accum_steps}")
        per_step = world_size * cfg.grad_accum_steps
        if cfg.global_batch_size < 0 or cfg.global_batch_size % per_step:
            raise UsageError(f"--global-batch-size {cfg.global_batch_size} must be positive and divide by the world "
                             f"size {world_size} x --grad-accum-steps {cfg.grad_accum_steps}")
        return dataclasses.replace(cfg, batch_size=cfg.global_batch_size // per_step)
    return cfg


# --- validation -----------------------------------------------------------------------------------------------


def validate(cfg: Config, world_size: int) -> None:
    for f in FIELDS:
        value, name = getattr(cfg, f.name), flag_name(f)
        choices = _choices(f)
        if choices and value not in choices:
            noun = f.metadata["noun"] or name
            raise UsageError(f"--{name}: unknown {noun} {value!r} (choose from {', '.join(c for c in choices if c)})")
        check = f.metadata["check"]
        if check and not check[0](value):
            raise UsageError(f"--{name} {check[1]}, got {value}")
    for ok, message in _cross_checks(cfg, world_size):
        if not ok:
            raise UsageError(message)


def _cross_checks(cfg: Config, world_size: int):
    """Rules that relate several flags, each with the message shown when it fails (checked in this order)."""
    mistake = BREAKS.get(cfg.break_)
    yield (mistake is None or world_size >= mistake.ranks,
           f"--break {cfg.break_} needs several ranks: launch with torchrun --nproc_per_node=2")
    # Summed micro-batch losses have no per-sample meaning to accumulate: the sum-loss demo runs at k = 1 only.
    yield cfg.break_ != "sum-loss" or cfg.grad_accum_steps == 1, "--break sum-loss needs --grad-accum-steps 1"
    yield cfg.optimizer == "sgd" or cfg.momentum == 0, "--momentum applies to --optimizer sgd only"
    yield (cfg.model != "linear" or (not cfg.batchnorm and cfg.dropout == 0),
           "--batchnorm and --dropout need a model with hidden layers, not --model linear")
    yield (cfg.run_name == "" or (os.sep not in cfg.run_name and cfg.run_name not in (".", "..")),
           f"--run-name must be a plain name, not a path: {cfg.run_name!r}")
    yield (dataset_shape(cfg.dataset, cfg.dim, cfg.classes) == (cfg.dim, cfg.classes),
           f"--dim and --classes apply to the rule dataset; {cfg.dataset} is fixed at 2 dimensions and 2 classes")
    yield (not cfg.sync_batchnorm or cfg.batchnorm, "--sync-batchnorm needs --batchnorm")
    yield (not cfg.sync_batchnorm or _on_cuda(cfg.device),
           "--sync-batchnorm needs --device cuda: torch.nn.SyncBatchNorm raises 'SyncBatchNorm layers only work with "
           "GPU modules' under DDP on CPU, so on CPU each rank normalises with its own batch's statistics")
    # The data's sizes and sample shape, from the flags (or an npz file's headers: a bad file is refused here).
    n_train, n_val, shape = dataset_layout(cfg.dataset, cfg.n_samples, cfg.val_fraction, cfg.dim, cfg.classes)
    yield (npz_path(cfg.dataset) is None or min(n_train, n_val) >= world_size,
           f"--dataset {cfg.dataset}: {n_train} training and {n_val} validation samples for {world_size} rank(s): "
           "every rank needs at least one of each")
    yield (cfg.model != "cnn" or len(shape) == 3,
           f"--model cnn needs images, samples of shape (channels, height, width); --dataset {cfg.dataset} gives "
           f"samples of shape {shape}")
    yield (cfg.limit_samples <= n_train,
           f"--limit-samples {cfg.limit_samples} exceeds the {n_train} training samples")
    n_train = cfg.limit_samples or n_train
    yield n_train >= 1, f"--val-fraction {cfg.val_fraction} leaves no training samples out of {n_train + n_val}"
    shard = math.ceil(n_train / world_size)
    yield (cfg.batch_size <= shard, f"--batch-size {cfg.batch_size} exceeds a rank's shard of {shard} training "
           f"samples ({n_train} over {world_size} rank(s))")
    step = cfg.batch_size * cfg.grad_accum_steps
    yield (step <= shard, f"--batch-size {cfg.batch_size} x --grad-accum-steps {cfg.grad_accum_steps} exceeds a "
           f"rank's shard of {shard} training samples ({n_train} over {world_size} rank(s))")
    if cfg.batchnorm:
        yield _batchnorm_rule(cfg, n_train, n_val, world_size)
    yield from _instrument_checks(cfg, world_size)


def _instrument_checks(cfg: Config, world_size: int):
    yield (not cfg.noise_scale or world_size > 1 or cfg.grad_accum_steps >= 2,
           "--noise-scale needs two batch sizes: at world size 1 give --grad-accum-steps 2 or more (one micro-batch "
           "is the small batch, the step the big one), or launch several ranks with torchrun")
    yield (cfg.noise_scale or cfg.noise_scale_every is None, "--noise-scale-every needs --noise-scale")
    yield (not cfg.noise_scale or cfg.precision != "fp16",
           "--noise-scale with --precision fp16: its hooks see the gradients before the GradScaler divides its scale "
           "back out; use --precision bf16 or fp32")
    yield (not cfg.noise_scale or cfg.break_ != "no-grad-sync",
           "--noise-scale with --break no-grad-sync: the gradients are never all-reduced, so there is no second "
           "batch size")
    yield (cfg.tensorboard or not (cfg.layer_stats or cfg.histograms_every),
           "--layer-stats and --histograms-every write to TensorBoard: drop --no-tensorboard")
    yield not (cfg.lr_find and cfg.resume), "--lr-find starts from a fresh model: drop --resume"
    yield (cfg.lr_find_min < cfg.lr_find_max,
           f"--lr-find-min {cfg.lr_find_min} must be below --lr-find-max {cfg.lr_find_max}")


def _on_cuda(device: str) -> bool:
    import torch  # already loaded by the caller's imports; kept local so the flag declarations stay torch-free

    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def _batchnorm_rule(cfg: Config, n_train: int, n_val: int, world_size: int) -> tuple[bool, str]:
    """BatchNorm in train mode cannot normalise a batch of one sample (its variance is undefined): refuse any
    layout whose micro-batches, on any rank, include one of a single sample. The same rule at every world size:
    it looks at the per-rank micro-batches that world size produces."""
    shard = n_train if cfg.break_ == "no-distributed-sampler" else math.ceil(n_train / world_size)
    step = cfg.batch_size * cfg.grad_accum_steps
    last_step = shard - (math.ceil(shard / step) - 1) * step
    last_micro = last_step - (math.ceil(last_step / cfg.batch_size) - 1) * cfg.batch_size
    if cfg.batch_size == 1 or last_micro == 1:
        return False, (f"--batchnorm: a training micro-batch would hold 1 sample ({shard} samples per rank in "
                       f"micro-batches of {cfg.batch_size}, steps of {step}); BatchNorm cannot normalise one sample "
                       "in train mode: change --n-samples, --batch-size or --grad-accum-steps")
    if cfg.break_ == "no-eval-mode":  # validation then runs in train mode too
        val_shard = n_val // world_size  # the smallest rank's share once the padding is dropped
        tail = val_shard - (math.ceil(val_shard / cfg.eval_batch_size) - 1) * cfg.eval_batch_size
        if val_shard <= 1 or tail == 1:
            return False, (f"--batchnorm with --break no-eval-mode: a validation batch would hold 1 sample "
                           f"({n_val} validation samples over {world_size} rank(s)); change --n-samples, "
                           "--val-fraction or --eval-batch-size")
    return True, ""
