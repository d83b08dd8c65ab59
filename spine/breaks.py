"""The deliberate mistakes of `--break NAME`, in one registry.

This registry is the single source of `--break`'s choices and help, of `make break` (launch/break_all.py), of the
README's table (a test keeps them equal) and of the tests. Each entry names the mistake, the ranks it needs, the
symptoms the harness must report for it (spine/symptoms.py), and the mechanism: why it breaks training.

Four mistakes are a forgotten line, so they stay in train.py beside the line they remove (`patch` is None):
no-set-epoch, no-train-mode, no-zero-grad and no-eval-mode. Every other one is a small named patch below,
applied once to the parts train.py has built, before the first step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import DistributedSampler


class Parts(NamedTuple):
    """What train.py builds before the loop, and a patch may change."""

    model: nn.Module
    ddp_model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    sampler: DistributedSampler
    validation: Any  # train.Validation (not imported: train.py imports this module)


Patch = Callable[[Parts, Any], Parts]  # (parts, DistContext) -> parts


@dataclass(frozen=True)
class Variant:
    """The same mistake under other flags, run by make break beside it."""

    label: str
    flags: tuple[str, ...]
    symptoms: frozenset[str]


@dataclass(frozen=True)
class Mistake:
    name: str
    mistake: str  # one line: what is wrong
    ranks: int  # ranks needed to show it (the distributed ones are no-ops at world 1, so they are refused there)
    symptoms: frozenset[str]  # what the harness must report
    mechanism: str  # why it breaks training
    patch: Patch | None = None  # None: an inline check in train.py, beside its correct line
    variants: tuple[Variant, ...] = field(default=())


# --- the patches ------------------------------------------------------------------------------------------------


def thousandfold_lr(parts: Parts, ctx) -> Parts:
    """huge-lr: every parameter group's lr x 1000 (before the scheduler records it as the peak)."""
    for group in parts.optimizer.param_groups:
        group["lr"] = group["lr"] * 1000
    return parts


def summed_loss(parts: Parts, ctx) -> Parts:
    """sum-loss: the loss sums over the batch instead of averaging (train.py still logs it per sample)."""
    return parts._replace(loss_fn=nn.CrossEntropyLoss(reduction="sum"))


def softmax_before_the_loss(parts: Parts, ctx) -> Parts:
    """softmax-logits: the training forward returns probabilities; validation (eval mode) still sees logits."""

    def squash(module: nn.Module, _inputs, logits: torch.Tensor) -> torch.Tensor | None:
        return logits.softmax(1) if module.training else None

    parts.model.register_forward_hook(squash)
    return parts


def storage_order_sampler(parts: Parts, ctx) -> Parts:
    """no-shuffle: the sampler keeps the storage order."""
    s = parts.sampler
    return parts._replace(sampler=DistributedSampler(s.dataset, num_replicas=s.num_replicas, rank=s.rank,
                                                     shuffle=False, seed=s.seed))


def single_replica_sampler(parts: Parts, ctx) -> Parts:
    """no-distributed-sampler: a sampler built for one replica, so every rank walks the whole dataset."""
    s = parts.sampler
    return parts._replace(sampler=DistributedSampler(s.dataset, num_replicas=1, rank=0, shuffle=True, seed=s.seed))


def skip_all_reduce(_state, bucket):  # no annotations: DDP checks them, and postponed ones are strings to it
    """A DDP communication hook (a dist.GradBucket in, a Future of its tensor out) that communicates nothing:
    each rank keeps its own, local gradient."""
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def no_gradient_sync(parts: Parts, ctx) -> Parts:
    """no-grad-sync: DDP's all-reduce replaced by skip_all_reduce."""
    parts.ddp_model.register_comm_hook(None, skip_all_reduce)
    return parts


def unreduced_validation(parts: Parts, ctx) -> Parts:
    """rank0-val: validation metrics from this rank's own sums instead of the all-reduced ones."""

    def own_shard(local: torch.Tensor, _reduced: list[float]) -> tuple[float, float]:
        loss_sum, correct, count = local.tolist()
        return loss_sum / count, correct / count

    parts.validation.metrics = own_shard
    return parts


def padded_validation(parts: Parts, ctx) -> Parts:
    """padded-val: the validation shard keeps DistributedSampler's padding (repeats of the first indices)."""
    v = parts.validation
    padded = DistributedSampler(range(len(v.x)), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=False)
    v.shard = torch.tensor(list(padded), dtype=torch.long, device=v.x.device)
    return parts


# --- the registry -----------------------------------------------------------------------------------------------

_ALL = [
    Mistake("no-train-mode", "`model.train()` never called: training runs in eval mode", 1,
            frozenset({"trained-in-eval-mode"}),
            "Validation (and the initial-loss evaluation) leaves the model in eval mode and nothing switches it "
            "back, so every step trains with dropout off and BatchNorm normalising with its running statistics, "
            "which then never update."),
    Mistake("no-eval-mode", "validation runs in train mode", 1,
            frozenset({"validated-in-train-mode", "val-mismatch"}),
            "Dropout drops units of the validation forward, and BatchNorm normalises each validation batch with that "
            "batch's own statistics (so the result depends on --eval-batch-size) and moves its running statistics "
            "towards them (a moving average, momentum 0.1). The dropout masks drawn during validation consume the "
            "global RNG, so every later training mask differs too."),
    Mistake("huge-lr", "learning rate 1000x `--lr`", 1, frozenset({"diverged"}),
            "Gradient descent on a quadratic diverges once lr x (largest Hessian eigenvalue) > 2: each step "
            "overshoots the minimum by more than it corrects, so the error grows geometrically.",
            patch=thousandfold_lr),
    Mistake("no-zero-grad", "gradients accumulate across steps", 1, frozenset({"diverged"}),
            "`.grad` adds up across backward calls, so step t applies the sum of all t gradients so far (with "
            "momentum, a sum of sums) and SGD's steps grow until they diverge. The logged norm is that of the "
            "accumulated `.grad`, so it rises by construction. Adam's m/sqrt(v) keeps each step near lr, so it "
            "does not blow up; it follows a stale running sum instead of the current gradient."),
    Mistake("no-shuffle", "no shuffling (with `--order sorted`: single-class batches)", 1,
            frozenset({"repeated-order", "loss-spike"}),
            "Every epoch walks the training set in storage order. Sorted by class, each batch holds one class, so "
            "the model is pulled towards one class after the other and the loss climbs each time the class changes.",
            patch=storage_order_sampler,
            variants=(Variant("random storage", ("--order", "random"), frozenset({"repeated-order"})),)),
    Mistake("no-set-epoch", "`sampler.set_epoch` never called", 1, frozenset({"repeated-order"}),
            "DistributedSampler seeds its permutation with seed + epoch; without set_epoch its epoch stays 0, so "
            "every epoch repeats epoch 0's order."),
    Mistake("sum-loss", "`reduction=\"sum\"`: the step grows with the per-rank batch", 1,
            frozenset({"oscillation"}),
            "A summed loss makes the gradient, and so the step, proportional to the number of samples it sums: "
            "batch 32 acts like a 32x lr. DDP then averages the per-rank sums, so the step scales with the per-rank "
            "batch, not the global one, and changes with the layout (ranks x per-rank batch) at a fixed global batch.",
            patch=summed_loss),
    Mistake("softmax-logits", "softmax before a loss that expects logits", 1, frozenset({"plateau"}),
            "CrossEntropyLoss applies log-softmax itself. Fed probabilities in [0, 1], the best it can reach for "
            "K classes is -log(e / (e + K - 1)), 0.313 for K = 2, and the gradients through the double softmax are "
            "small. Only the training path is changed: validation sees raw logits.",
            patch=softmax_before_the_loss),
    Mistake("no-distributed-sampler", "every rank trains on the whole dataset", 2,
            frozenset({"overlapping-shards"}),
            "A sampler built for one replica gives every rank the whole dataset in the same order: the ranks "
            "compute identical gradients, so an epoch costs world x the work and takes world x the steps.",
            patch=single_replica_sampler),
    Mistake("no-grad-sync", "each rank steps on its own gradients", 2, frozenset({"replicas-diverged"}),
            "A communication hook that skips DDP's all-reduce: each rank steps on its own shard's gradient, so the "
            "replicas drift apart and rank 0's weights have seen only its own shard's gradients.",
            patch=no_gradient_sync),
    Mistake("rank0-val", "validation metrics from rank 0's shard only", 2, frozenset({"val-mismatch"}),
            "Without reducing the sums over ranks, the reported metric is rank 0's 1/world of the validation set.",
            patch=unreduced_validation),
    Mistake("padded-val", "DistributedSampler's padding counted in validation", 2, frozenset({"val-mismatch"}),
            "DistributedSampler pads the index list with repeats of its first entries until it divides by the "
            "world size; counting them weights those samples twice.", patch=padded_validation),
]
BREAKS: dict[str, Mistake] = {m.name: m for m in _ALL}


def apply(name: str, parts: Parts, ctx) -> Parts:
    """The parts with mistake `name` applied (unchanged for "" and for the four inline mistakes)."""
    mistake = BREAKS.get(name)
    return mistake.patch(parts, ctx) if mistake and mistake.patch else parts
