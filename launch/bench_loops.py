"""The loops train.py is compared with: bare (also as bare DDP) and tutorial-style.

Each takes a model and optimizer built exactly as train.py builds them (same
data, seed, Adam lr 0.01, per-rank batch) and returns (first loss, last loss)
so a caller can check it really trained. Only the loop itself is timed by the
caller; building the model and optimizer is set-up, as it is for train.py.
"""

from __future__ import annotations

import math
from typing import TextIO

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from data import SplitDataset, build_dataset
from models import build_model
from spine.config import Config
from spine.optim import build_optimizer


def build_problem(cfg: Config) -> tuple[SplitDataset, nn.Module, torch.optim.Optimizer]:
    """Data, model and optimizer as train.py builds them from `cfg` (CPU)."""
    data = build_dataset(cfg.dataset, cfg.n_samples, cfg.val_fraction, cfg.noise, cfg.dim, cfg.classes,
                         cfg.data_seed, cfg.order)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.in_dim, data.num_classes, cfg.hidden, cfg.activation, cfg.dropout,
                        cfg.batchnorm)
    optimizer = build_optimizer(cfg.optimizer, list(model.parameters()), cfg.lr, cfg.momentum, cfg.weight_decay)
    return data, model, optimizer


def bare_loop(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
              batch_size: int, epochs: int, rank: int = 0, world: int = 1, seed: int = 0) -> tuple[float, float]:
    """What one writes by hand over in-memory tensors. At world > 1 the caller wraps `model` in DDP (bare DDP):
    each rank takes its 1/world slice of the same permutation, as DistributedSampler does."""
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    first = last = None
    for _ in range(epochs):
        shard = torch.randperm(len(x), generator=gen)[rank::world]  # same permutation on every rank
        for start in range(0, len(shard), batch_size):
            idx = shard[start:start + batch_size]
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            first = loss.detach() if first is None else first
        last = loss.detach()
    return first.item(), last.item()


def tutorial_loop(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  batch_size: int, epochs: int, log: TextIO, seed: int = 0) -> tuple[float, float]:
    """The loop tutorials teach: DataLoader with default collate, DistributedSampler, a log line every step."""
    loss_fn = nn.CrossEntropyLoss()
    dataset = TensorDataset(x, y)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    first = last = math.nan
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for step, (xb, yb) in enumerate(loader):
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            last = loss.item()
            first = last if math.isnan(first) else first
            print(f"epoch {epoch} step {step} loss {last:.4f}", file=log)
    return first, last
