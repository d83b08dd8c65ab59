"""Optimizer and learning-rate schedule from the config."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.autograd.graph import Node, get_gradient_edge


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """foreach=True: torch picks the multi-tensor update by default only when every parameter is on a GPU. On the
    CPU it is one call per operation for all parameters instead of one per parameter and operation, the same
    kernels on the same floats (bit-identical weights): less Python per update on a small model (make bench's
    "Adam's update" rows time the two)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=True)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
    raise ValueError(f"unknown optimizer {name!r}")


def grad_accumulators(params: Iterable[torch.nn.Parameter]) -> list[Node]:
    """Each trainable parameter's AccumulateGrad node, the autograd node whose backward adds into .grad. Autograd
    keeps it only while something refers to it: a graph, or DDP's reducer, which holds them. train.py's step keeps
    detached values and drops its graph before the optimizer step, so without a reference held for the run every
    forward would build these nodes again and every step free them, each time taking the interpreter lock to
    reference or release the parameter's Python object: on a small CPU model, a visible part of the step."""
    return [get_gradient_edge(p).node for p in params if p.requires_grad]


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int) -> float:
    """Multiplier of the peak lr for the update that follows `step` completed steps."""
    if step < warmup_steps:
        # Linear from 1/warmup to 1: the first update is small, never zero.
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


class LRSchedule:
    """Per step, each parameter group's lr = its peak x lr_factor(step): LambdaLR's arithmetic (the same floats)
    without its bookkeeping, which on a small step costs more than the step's own arithmetic. `step()` after
    `optimizer.step()` sets the lr of the next step; a constant lr, once set, is left alone."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, schedule: str, warmup_steps: int) -> None:
        self.optimizer, self.total_steps, self.schedule, self.warmup_steps = optimizer, total_steps, schedule, \
            warmup_steps
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]  # the peaks
        self.last_epoch = 0  # steps taken (LambdaLR's name, so its state_dict loads too)
        self._apply()

    def _apply(self) -> None:
        factor = lr_factor(self.last_epoch, self.total_steps, self.schedule, self.warmup_steps)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def step(self) -> None:
        self.last_epoch += 1
        if self.schedule != "constant" or self.last_epoch <= self.warmup_steps:  # else the factor stays 1, as set
            self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        """The step count and peaks; the current lr comes back with the optimizer's own state."""
        self.last_epoch, self.base_lrs = state["last_epoch"], list(state["base_lrs"])


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, schedule: str,
                    warmup_steps: int) -> LRSchedule:
    return LRSchedule(optimizer, total_steps, schedule, warmup_steps)
