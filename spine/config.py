"""Command line -> a frozen, validated Config.

Validation happens before anything touches the disk or the network, so a bad
flag costs nothing: one line naming the flag, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass

from data import DATASETS, dataset_shape, split_sizes
from models import MODELS
from spine.errors import UsageError

OPTIMIZERS = ("sgd", "adam", "adamw")

# Deliberate bugs for `make break` (--break NAME): each one is a single changed line in train.py.
BREAKS = {
    "no-train-mode": "model.train() is never called, so training runs in eval mode (dropout off, BatchNorm frozen)",
    "no-eval-mode": "validation runs in train mode (dropout on, BatchNorm uses and updates batch statistics)",
    "huge-lr": "the learning rate is 1000x --lr",
    "no-zero-grad": "optimizer.zero_grad() is never called, so every step re-applies all earlier gradients",
    "no-shuffle": "the sampler does not shuffle: every epoch walks the storage order",
    "no-set-epoch": "sampler.set_epoch() is never called: every epoch repeats epoch 0's order",
    "no-distributed-sampler": "every rank trains on the whole dataset instead of its 1/world shard",
    "no-grad-sync": "each rank steps on its own gradients (DDP's all-reduce is skipped)",
    "rank0-val": "validation metrics are rank 0's shard only, not reduced over ranks",
    "padded-val": "DistributedSampler's padding duplicates are counted in validation",
    "sum-loss": "the loss is summed over the batch instead of averaged",
    "softmax-logits": "softmax is applied to the logits before CrossEntropyLoss, which expects raw logits",
}
NEEDS_RANKS = ("no-distributed-sampler", "no-grad-sync", "rank0-val", "padded-val")
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = "moons"
    n_samples: int = 200
    val_fraction: float = 0.2
    noise: float = 0.1
    dim: int = 2
    classes: int = 2
    data_seed: int = 0
    order: str = "random"
    limit_samples: int = 0
    # model
    model: str = "mlp"
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "relu"
    dropout: float = 0.0
    batchnorm: bool = False
    # optimisation
    optimizer: str = "adam"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: float = 0.0
    epochs: int = 100
    batch_size: int = 32
    global_batch_size: int = 0
    grad_accum_steps: int = 1
    eval_batch_size: int = 4096
    target_loss: float = 1e-3
    seed: int = 0
    mistake: str = ""
    # system
    device: str = "auto"
    threads: int = 0
    pg_timeout: float = 120.0
    # outputs
    run_name: str = ""
    runs_dir: str = "runs"
    checkpoints_dir: str = "checkpoints"
    resume: str = ""
    overwrite: bool = False
    checkpoint_every_steps: int = 0
    checkpoint_every_epochs: int = 0
    checkpoint_every_seconds: float = 60.0
    keep_checkpoints: int = 3
    log_every: int = 10
    print_every: int = 1
    tensorboard: bool = True

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @staticmethod
    def from_dict(d: dict) -> Config:
        known = {f.name for f in dataclasses.fields(Config)}
        d = {k: v for k, v in d.items() if k in known}
        d["hidden"] = tuple(d.get("hidden", ()))
        return Config(**d)

    def default_run_name(self) -> str:
        return f"{self.dataset}-{self.model}-seed{self.seed}"


def _hidden(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(w <= 0 for w in widths):
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return widths


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except for on/off switches where "(default: False)" says nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if isinstance(action.default, bool):
            return action.help or ""
        return super()._get_help_string(action)


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we want just the error, one line."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    p = _OneLineParser(
        prog="train.py",
        description="Hand-written, DDP-aware training loop on synthetic data. "
        "Run with `python train.py` (one process) or `torchrun --nproc_per_node=N train.py` (N ranks).",
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset, help=f"one of: {', '.join(DATASETS)}")
    g.add_argument("--n-samples", type=int, default=d.n_samples, help="total samples, train + validation")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share held out for validation, in (0, 1)")
    g.add_argument("--noise", type=float, default=d.noise, help="noise level of the generator (>= 0)")
    g.add_argument("--dim", type=int, default=d.dim, help="input dimensions (rule dataset only)")
    g.add_argument("--classes", type=int, default=d.classes, help="number of classes (rule dataset only)")
    g.add_argument("--data-seed", type=int, default=d.data_seed,
                   help="seed of the data generator, independent of --seed")
    g.add_argument("--order", choices=("random", "sorted"), default=d.order,
                   help="storage order of the training set: sorted groups it by class")
    g.add_argument("--limit-samples", type=int, default=d.limit_samples,
                   help="train on only the first N training samples (the single-batch overfit check); 0 = all")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, help=f"one of: {', '.join(MODELS)}")
    g.add_argument("--hidden", type=_hidden, default=d.hidden, help="hidden widths, comma-separated, e.g. 64,64")
    g.add_argument("--activation", choices=("relu", "tanh", "gelu"), default=d.activation)
    g.add_argument("--dropout", type=float, default=d.dropout,
                   help="dropout probability after each hidden layer, in [0, 1)")
    g.add_argument("--batchnorm", action="store_true", help="BatchNorm1d after each hidden linear layer")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default=d.optimizer, help=f"one of: {', '.join(OPTIMIZERS)}")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (> 0)")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum, in [0, 1)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="L2 (SGD, Adam) or decoupled (AdamW) weight decay")
    g.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="learning-rate schedule after warmup")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help="linear warmup from 0 to --lr over this many steps")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip,
                   help="clip the global grad norm to this value; 0 = off (the norm is logged either way)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="total epochs; a resume continues up to this number")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per rank per step")
    g.add_argument("--global-batch-size", type=int, default=d.global_batch_size,
                   help="samples per optimizer step over all ranks (instead of --batch-size): per-rank batch x world "
                        "size x --grad-accum-steps, so it must divide by their product")
    g.add_argument("--grad-accum-steps", type=int, default=d.grad_accum_steps,
                   help="micro-batches of --batch-size per optimizer step on each rank; gradients add up locally "
                        "(DDP's no_sync) and are all-reduced once, on the last")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="samples per validation forward")
    g.add_argument("--target-loss", type=float, default=d.target_loss,
                   help="report the first epoch and step at which the epoch's train loss is <= this")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of initialisation, shuffling and dropout")
    g.add_argument("--break", dest="mistake", default="", metavar="NAME",
                   help="inject one deliberate bug (make break): " + ", ".join(BREAKS))
    g = p.add_argument_group("system")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device,
                   help="auto = cuda when available; the backend follows (nccl on cuda, gloo on cpu)")
    g.add_argument("--threads", type=int, default=d.threads,
                   help="CPU threads per rank; 0 = physical cores // ranks on this node")
    g.add_argument("--pg-timeout", type=float, default=d.pg_timeout,
                   help="seconds a collective may wait for a lost rank before failing")
    g = p.add_argument_group("outputs")
    g.add_argument("--run-name", default=d.run_name, help="name of the run; default <dataset>-<model>-seed<seed>")
    g.add_argument("--runs-dir", default=d.runs_dir,
                   help="TensorBoard logs, metrics.jsonl and summary.json go to <runs-dir>/<run-name>/")
    g.add_argument("--checkpoints-dir", default=d.checkpoints_dir,
                   help="checkpoints go to <checkpoints-dir>/<run-name>/")
    g.add_argument("--resume", default=d.resume,
                   help="'auto' = continue from the run's last.pt if there is one, else start fresh; or a checkpoint "
                        "path")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing run of the same name instead of refusing")
    g.add_argument("--checkpoint-every-steps", type=int, default=d.checkpoint_every_steps,
                   help="also write last.pt every N optimizer steps; 0 = only at epoch ends")
    g.add_argument("--checkpoint-every-epochs", type=int, default=d.checkpoint_every_epochs,
                   help="write last.pt every N epochs; 0 = off. The final epoch is always saved; best.pt is the "
                        "best of the saved checkpoints")
    g.add_argument("--checkpoint-every-seconds", type=float, default=d.checkpoint_every_seconds,
                   help="write last.pt at the end of the first epoch at least this many seconds after the last "
                        "save (rank 0's clock decides for all ranks); 0 = off")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                   help="step checkpoints kept on disk (newest first); last.pt and best.pt point into them")
    g.add_argument("--log-every", type=int, default=d.log_every,
                   help="every N steps: per-step scalars to TensorBoard, a non-finite check, and a console line in "
                        "long epochs")
    g.add_argument("--print-every", type=int, default=d.print_every,
                   help="console line every N epochs (the last is always printed)")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", help="skip TensorBoard event files")
    return p


def parse_config(argv: list[str] | None = None, world_size: int | None = None) -> Config:
    """Parse and validate; raises UsageError with a one-line message."""
    ns = build_parser().parse_args(argv)
    cfg = Config(**{k: v for k, v in vars(ns).items()})
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = _resolve_batch(cfg, world_size)
    validate(cfg, world_size)
    if not cfg.run_name:
        cfg = dataclasses.replace(cfg, run_name=cfg.default_run_name())
    return cfg


def _resolve_batch(cfg: Config, world_size: int) -> Config:
    """--global-batch-size G sets the per-rank micro-batch: G = batch_size x world_size x grad_accum_steps."""
    if cfg.global_batch_size:
        if cfg.grad_accum_steps < 1:
            raise UsageError(f"--grad-accum-steps must be at least 1, got {cfg.grad_accum_steps}")
        per_step = world_size * cfg.grad_accum_steps
        if cfg.global_batch_size < 0 or cfg.global_batch_size % per_step:
            raise UsageError(
                f"--global-batch-size {cfg.global_batch_size} must be positive and divide by the world size "
                f"{world_size} x --grad-accum-steps {cfg.grad_accum_steps}"
            )
        return dataclasses.replace(cfg, batch_size=cfg.global_batch_size // per_step)
    return cfg


def validate(cfg: Config, world_size: int) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UsageError(message)

    need(cfg.dataset in DATASETS, f"--dataset: unknown dataset {cfg.dataset!r} (choose from {', '.join(DATASETS)})")
    need(cfg.model in MODELS, f"--model: unknown model {cfg.model!r} (choose from {', '.join(MODELS)})")
    need(cfg.optimizer in OPTIMIZERS,
         f"--optimizer: unknown optimizer {cfg.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
    need(math.isfinite(cfg.lr) and cfg.lr > 0, f"--lr must be a positive number, got {cfg.lr}")
    need(cfg.epochs > 0, f"--epochs must be positive, got {cfg.epochs}")
    need(cfg.batch_size > 0, f"--batch-size must be positive, got {cfg.batch_size}")
    need(cfg.grad_accum_steps >= 1, f"--grad-accum-steps must be at least 1, got {cfg.grad_accum_steps}")
    # Summed micro-batch losses have no per-sample meaning to accumulate: the sum-loss demo runs at k = 1 only.
    need(cfg.mistake != "sum-loss" or cfg.grad_accum_steps == 1, "--break sum-loss needs --grad-accum-steps 1")
    need(cfg.eval_batch_size > 0, f"--eval-batch-size must be positive, got {cfg.eval_batch_size}")
    need(0 < cfg.val_fraction < 1, f"--val-fraction must lie in (0, 1), got {cfg.val_fraction}")
    need(cfg.n_samples >= 2, f"--n-samples must be at least 2, got {cfg.n_samples}")
    need(math.isfinite(cfg.noise) and cfg.noise >= 0, f"--noise must be >= 0, got {cfg.noise}")
    need(cfg.dim > 0, f"--dim must be positive, got {cfg.dim}")
    need(cfg.classes >= 2, f"--classes must be at least 2, got {cfg.classes}")
    need(0 <= cfg.dropout < 1, f"--dropout must lie in [0, 1), got {cfg.dropout}")
    need(0 <= cfg.momentum < 1, f"--momentum must lie in [0, 1), got {cfg.momentum}")
    need(cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {cfg.warmup_steps}")
    need(cfg.grad_clip >= 0, f"--grad-clip must be >= 0 (0 = off), got {cfg.grad_clip}")
    need(cfg.threads >= 0, f"--threads must be >= 0 (0 = automatic), got {cfg.threads}")
    need(cfg.pg_timeout > 0, f"--pg-timeout must be positive, got {cfg.pg_timeout}")
    need(cfg.checkpoint_every_steps >= 0, f"--checkpoint-every-steps must be >= 0, got {cfg.checkpoint_every_steps}")
    need(cfg.checkpoint_every_epochs >= 0,
         f"--checkpoint-every-epochs must be >= 0 (0 = off), got {cfg.checkpoint_every_epochs}")
    need(math.isfinite(cfg.checkpoint_every_seconds) and cfg.checkpoint_every_seconds >= 0,
         f"--checkpoint-every-seconds must be >= 0 (0 = off), got {cfg.checkpoint_every_seconds}")
    need(cfg.keep_checkpoints > 0, f"--keep-checkpoints must be positive, got {cfg.keep_checkpoints}")
    need(cfg.log_every > 0, f"--log-every must be positive, got {cfg.log_every}")
    need(cfg.print_every > 0, f"--print-every must be positive, got {cfg.print_every}")
    need(cfg.mistake == "" or cfg.mistake in BREAKS,
         f"--break: unknown mistake {cfg.mistake!r} (choose from {', '.join(BREAKS)})")
    need(cfg.mistake not in NEEDS_RANKS or world_size > 1,
         f"--break {cfg.mistake} needs several ranks: launch with torchrun --nproc_per_node=2")
    need(cfg.optimizer == "sgd" or cfg.momentum == 0, "--momentum applies to --optimizer sgd only")
    need(cfg.model != "linear" or (not cfg.batchnorm and cfg.dropout == 0),
         "--batchnorm and --dropout need a model with hidden layers, not --model linear")
    need(cfg.run_name == "" or (os.sep not in cfg.run_name and cfg.run_name not in (".", "..")),
         f"--run-name must be a plain name, not a path: {cfg.run_name!r}")
    n_train, _ = split_sizes(cfg.n_samples, cfg.val_fraction)
    need(cfg.limit_samples >= 0, f"--limit-samples must be >= 0 (0 = all), got {cfg.limit_samples}")
    need(cfg.target_loss > 0, f"--target-loss must be positive, got {cfg.target_loss}")
    if cfg.limit_samples:
        need(cfg.limit_samples <= n_train,
             f"--limit-samples {cfg.limit_samples} exceeds the {n_train} training samples")
        n_train = cfg.limit_samples
    need(n_train >= 1, f"--val-fraction {cfg.val_fraction} leaves no training samples out of {cfg.n_samples}")
    shard = math.ceil(n_train / world_size)
    need(cfg.batch_size <= shard,
         f"--batch-size {cfg.batch_size} exceeds a rank's shard of {shard} training samples "
         f"({n_train} over {world_size} rank(s))")
    need(cfg.batch_size * cfg.grad_accum_steps <= shard,
         f"--batch-size {cfg.batch_size} x --grad-accum-steps {cfg.grad_accum_steps} exceeds a rank's shard of "
         f"{shard} training samples ({n_train} over {world_size} rank(s))")
    need(dataset_shape(cfg.dataset, cfg.dim, cfg.classes) == (cfg.dim, cfg.classes),
         f"--dim and --classes apply to the rule dataset; {cfg.dataset} is fixed at 2 dimensions and 2 classes")
