"""The reference train.py is measured against: a bare loop that does the work the mission requires.

A bare loop over in-memory tensors (one process, or one rank of bare DDP): a shuffle per epoch, forward, loss,
backward, step, zero-grad, and once per epoch a validation pass in eval mode under no_grad whose sums are
all-reduced at world > 1. Nothing else: no metrics, logging, checks or checkpoints. The model, optimizer and data
are built exactly as train.py builds them. It runs an epoch at a time, so that launch/bench_worker.py can run it
between train.py's epochs and time the two side by side.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from data import SplitDataset, build_dataset
from models import build_model
from spine.config import Config
from spine.distributed import all_reduce_sum
from spine.optim import build_optimizer


def build_problem(cfg: Config, device: torch.device) -> tuple[SplitDataset, nn.Module, torch.optim.Optimizer]:
    """Data, model and optimizer as train.py builds them from `cfg`."""
    data = build_dataset(cfg.dataset, cfg.n_samples, cfg.val_fraction, cfg.noise, cfg.dim, cfg.classes,
                         cfg.data_seed, cfg.order).to(device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.in_dim, data.num_classes, cfg.hidden, cfg.activation, cfg.dropout,
                        cfg.batchnorm).to(device)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    return data, model, optimizer


def bare_epochs(model: nn.Module, optimizer: torch.optim.Optimizer, data: SplitDataset, batch_size: int,
                rank: int = 0, world: int = 1, seed: int = 0, eval_batch: int = 4096) -> Iterator[tuple[float, float]]:
    """What one writes by hand, validation included, one epoch per `next()`: at world > 1 the caller wraps `model` in
    DDP (bare DDP) and each rank takes its 1/world slice of the same permutation. Yields (the first step's loss, the
    epoch's validation loss) after each epoch; endless, the caller takes as many epochs as it times."""
    loss_fn = nn.CrossEntropyLoss()
    x, y = data.train_x, data.train_y
    generator = torch.Generator().manual_seed(seed)
    first = None
    while True:
        model.train()
        shard = torch.randperm(len(x), generator=generator)[rank::world].to(x.device)
        for start in range(0, len(shard), batch_size):
            idx = shard[start:start + batch_size]
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            first = loss.item() if first is None else first
        model.eval()
        with torch.no_grad():
            sums = torch.zeros(3, dtype=torch.float64, device=x.device)  # loss sum, correct, count
            mine = torch.arange(rank, len(data.val_x), world, device=x.device)
            for start in range(0, len(mine), eval_batch):
                idx = mine[start:start + eval_batch]
                logits = model(data.val_x[idx])
                sums[0] += F.cross_entropy(logits, data.val_y[idx], reduction="sum").double()
                sums[1] += (logits.argmax(1) == data.val_y[idx]).sum()
                sums[2] += len(idx)
            loss_sum, _, count = all_reduce_sum(sums).tolist()
        yield first, loss_sum / count


def speed_drift(model: nn.Module, optimizer: torch.optim.Optimizer, data: SplitDataset, batch_size: int,
                seconds: float, chunk_steps: int = 25, min_chunks: int = 0) -> list[float]:
    """How the machine's speed moves: the seconds per step of the bare loop's steps, timed in consecutive chunks of
    `chunk_steps` for about `seconds`, and for at least `min_chunks` chunks however slow the machine is. Nothing
    else runs meanwhile, so every change between chunks is the machine's."""
    loss_fn = nn.CrossEntropyLoss()
    x, y = data.train_x, data.train_y
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    steps, per_step, start = len(x) // batch_size, [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(per_step) < min_chunks:
        t = time.perf_counter()
        for i in range(len(per_step) * chunk_steps, (len(per_step) + 1) * chunk_steps):
            idx = order[(i % steps) * batch_size:(i % steps + 1) * batch_size]
            loss_fn(model(x[idx]), y[idx]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        per_step.append((time.perf_counter() - t) / chunk_steps)
    return per_step
