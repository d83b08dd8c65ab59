"""Per-step bookkeeping that never forces a host sync inside the step.

Values stay on the device as 0-d tensors; they are stacked and reduced once
per epoch (and read at the cheap checkpoints the loop already has).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from spine.distributed import DistContext, all_reduce_sum


class GradNorm:
    """The L2 norm of a model's gradients taken as one vector, a 0-d tensor on their device: the arithmetic of
    torch.nn.utils.get_total_norm (one foreach kernel for each tensor's norm, then the norm of those), and the same
    bits. get_total_norm groups the tensors by device and dtype and checks foreach support on every call, which
    costs as much again as the norm itself on a small model; a model's parameters keep their device and dtype, so
    that is decided once here. Parameters on several devices or dtypes go through get_total_norm."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.one_group = len({(p.device, p.dtype) for p in params}) == 1

    def __call__(self) -> torch.Tensor:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not (self.one_group and grads):
            return torch.nn.utils.get_total_norm(grads)
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat(tensors), without its copy when there is only one."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


@dataclass(frozen=True)
class EpochTotals:
    """What every rank agrees on at the end of an epoch, from one all-reduce."""

    loss: float  # global mean train loss
    acc: float  # global train accuracy
    bad: list[float]  # per rank: 1 if a step not checked yet had a non-finite loss or grad norm, else 0
    shard_fingerprints: list[float]  # per rank: fingerprint of the indices it trained on
    rank0_flag: bool  # rank 0's value of `flag`: a decision (e.g. by its clock) every rank must share
    extra: list[float]  # `extra` summed over ranks (e.g. validation's loss sum, correct, count)
    step_losses: list[float]  # this rank's, per step
    step_grad_norms: list[float | None]  # this rank's, per step; None where the norm was not measured
    skipped_steps: int = 0  # steps of the epoch the fp16 GradScaler skipped (gradients inf/NaN): not a divergence


class EpochMeter:
    """This rank's steps of the current epoch: loss, logits and labels every step, the grad norm on the steps that
    measured it (train.py measures it on logged steps, and on every step when clipping). A step restored from a
    checkpoint carries its correct count instead of its logits.

    The predicted classes are taken in batches, not per step: each argmax is a kernel launch, and one argmax over
    many steps' logits costs little more than one over a single step's. The logits
    are held until they reach LOGITS_HELD elements (or the epoch's totals, or a checkpoint, need them), then reduced
    to predicted classes: the memory held stays bounded whatever the number of classes."""

    LOGITS_HELD = 1 << 20  # 4 MiB of fp32 logits

    def __init__(self) -> None:
        self.clear()

    def __len__(self) -> int:
        return len(self.losses)

    def clear(self) -> None:
        """A new epoch: nothing recorded yet."""
        self.losses: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []  # steps not yet reduced to predicted classes
        self._logits_held = 0  # their elements
        self.predicted: list[torch.Tensor] = []  # predicted classes of the steps before those, in batches
        self.labels: list[torch.Tensor] = []
        self.restored_correct: list[torch.Tensor] = []  # the correct counts of steps loaded from a checkpoint
        self.sizes: list[int] = []
        self.grad_norms: list[torch.Tensor] = []
        self.norm_steps: list[int] = []  # the index of the step each grad norm belongs to
        # The values already read to the host, in order (losses[:len(_losses_read)], likewise the norms).
        self._losses_read: list[float] = []
        self._norms_read: list[float] = []
        # Steps the fp16 GradScaler skipped: their gradients were inf or NaN and never reached the weights, so
        # their grad norms are not a divergence (their losses still are: a non-finite loss is never the scaler's).
        self.skipped: set[int] = set()

    def record(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
               grad_norm: torch.Tensor | None, skipped: bool = False) -> None:
        """One step's values, already detached (a 0-d loss, its (batch, classes) logits and 1-d labels, a 0-d norm
        or None), and whether the GradScaler skipped the step."""
        if skipped:
            self.skipped.add(len(self.losses))
        if grad_norm is not None:
            self.grad_norms.append(grad_norm)
            self.norm_steps.append(len(self.losses))
        self.losses.append(loss)
        self.logits.append(logits)
        self.labels.append(labels)
        self.sizes.append(labels.shape[0])
        self._logits_held += logits.numel()
        if self._logits_held >= self.LOGITS_HELD:
            self._reduce_logits()

    def _reduce_logits(self) -> None:
        """The held logits become predicted classes, in one argmax."""
        if self.logits:
            self.predicted.append(_joined(self.logits).argmax(1))
            self.logits, self._logits_held = [], 0

    def _correct(self) -> torch.Tensor | None:
        """Per sample of the recorded (not restored) steps, in order: whether its class was predicted."""
        self._reduce_logits()
        return _joined(self.predicted) == _joined(self.labels) if self.labels else None

    def correct_per_step(self) -> torch.Tensor:
        """Each step's count of correct predictions (restored steps first): a 1-d tensor on the device."""
        correct = self._correct()
        fresh = [c.sum() for c in correct.split(self.sizes[len(self.restored_correct):])] if correct is not None else []
        steps = self.restored_correct + fresh
        return torch.stack(steps) if steps else torch.zeros(0, dtype=torch.long)

    def _to_host(self, extra: list[torch.Tensor] | None = None) -> list[float]:
        """Reads the losses and grad norms not read yet to the host, with `extra` (0-d tensors, whose values it
        returns), in one transfer. Each value crosses once, whichever of a check, the logger or the epoch's totals
        asks for it first: every tensor op and transfer costs a few microseconds, on the steps that log."""
        losses, norms = self.losses[len(self._losses_read):], self.grad_norms[len(self._norms_read):]
        tensors = losses + norms + (extra or [])
        if not tensors:
            return []
        values = torch.stack(tensors).tolist()
        self._losses_read += values[:len(losses)]
        self._norms_read += values[len(losses):len(losses) + len(norms)]
        return values[len(losses) + len(norms):]

    def any_bad(self, since: int) -> bool:
        """Whether a loss or measured grad norm from step index `since` on is not finite (first_bad_step says
        which step, when one is). Reads them to the host: the cheap check of the healthy path."""
        self._to_host()
        norms = [v for i, v in zip(self.norm_steps, self._norms_read, strict=True) if i >= since and i not in
                 self.skipped]
        return not all(math.isfinite(v) for v in self._losses_read[since:] + norms)

    def first_bad_step(self, since: int, last_step: int) -> torch.Tensor:
        """Global step of the first step from index `since` whose loss or measured grad norm is not finite (0 =
        none), where `last_step` is the global step of the last one; +0.5 when only its gradient is bad: DDP
        spreads one rank's NaN into every rank's gradient, so the rank whose *loss* went bad sorts first and is the
        one named. A 0-d tensor on the device (the failure path only: it rides in the guard's second collective)."""
        n = len(self)
        if since >= n:
            return torch.zeros((), dtype=torch.float64, device=self.losses[0].device if n else None)
        device, never = self.losses[0].device, float(n)
        index = torch.arange(since, n, dtype=torch.float64, device=device)
        first_loss = torch.where(torch.isfinite(torch.stack(self.losses[since:])), never, index).min()
        norms = [(i, v) for i, v in self._checked_norms() if i >= since]
        first_norm = first_loss
        if norms:
            at = torch.tensor([i for i, _ in norms], dtype=torch.float64, device=device)
            first_norm = torch.where(torch.isfinite(torch.stack([v for _, v in norms])), never, at).min()
        first = torch.minimum(first_loss, first_norm)
        step = last_step - n + 1 + first + 0.5 * (first_norm < first_loss)
        return torch.where(first < never, step, 0.0)

    def end_of_epoch(self, ctx: DistContext, since: int, shard_fingerprint: str, flag: bool,
                     extra: torch.Tensor | None = None) -> EpochTotals:
        """The epoch's global train loss and accuracy (sums and counts over ranks, then one division) and every
        other end-of-epoch agreement, in one all-reduce: each collective is a round trip (about 0.4 ms on gloo
        here, `make scale`'s probe), and several per epoch cost more than a tiny epoch's steps.

        The per-step values not read yet come to the host in one transfer and are summed there (each tensor op
        costs a few microseconds, and a 5-step epoch has little else to do). Flags a non-finite value in the steps
        from `since`. The shard fingerprint (hex) travels as its first 13 digits, below 2**53 so float64 holds it
        exactly. `extra` (sums) is reduced along.
        """
        world, rank, n = ctx.world_size, ctx.rank, len(self)
        correct = self._correct()
        counts = self._to_host(([correct.sum(dtype=torch.float64)] if correct is not None else [])
                               + ([torch.stack(self.restored_correct).sum(dtype=torch.float64)]
                                  if self.restored_correct else []))
        correct_total = sum(counts)
        losses, norms = self._losses_read, self._norms_read
        bad = float(self.any_bad(since))
        per_rank = [0.0] * (3 * world)
        shard = float(int(shard_fingerprint[:13], 16))
        per_rank[rank], per_rank[world + rank], per_rank[2 * world + rank] = bad, shard, float(flag)
        slots = [sum(v * size for v, size in zip(losses, self.sizes, strict=True)), correct_total,
                 float(sum(self.sizes)), *per_rank, *(extra.tolist() if extra is not None else [])]
        values = all_reduce_sum(torch.tensor(slots, dtype=torch.float64, device=ctx.device)).tolist() \
            if world > 1 else slots
        step_norms: list[float | None] = [None] * n
        for i, v in zip(self.norm_steps, norms, strict=True):
            step_norms[i] = v
        return EpochTotals(values[0] / values[2], values[1] / values[2], values[3:3 + world],
                           values[3 + world:3 + 2 * world], values[3 + 2 * world] > 0, values[3 + 3 * world:],
                           losses, step_norms, len(self.skipped))

    def _checked_norms(self) -> list[tuple[int, torch.Tensor]]:
        """(step index, grad norm) of the measured steps the scaler did not skip: the ones a divergence shows in."""
        return [(i, v) for i, v in zip(self.norm_steps, self.grad_norms, strict=True) if i not in self.skipped]

    def series(self, start: int = 0) -> tuple[list[float], list[float | None]]:
        """Per-step losses and grad norms from `start` as Python floats (at most one transfer); None where a step
        did not measure its grad norm."""
        if start >= len(self.losses):
            return [], []
        self._to_host()
        losses = self._losses_read[start:]
        per_step: list[float | None] = [None] * (len(self) - start)
        for i, v in zip(self.norm_steps, self._norms_read, strict=True):
            if i >= start:
                per_step[i - start] = v
        return losses, per_step

    def state_dict(self) -> dict:
        empty = torch.zeros(0)
        return {"losses": torch.stack(self.losses).cpu() if self.losses else empty,
                "correct": self.correct_per_step().cpu(),
                "grad_norms": torch.stack(self.grad_norms).cpu() if self.grad_norms else empty,
                "norm_steps": list(self.norm_steps), "sizes": list(self.sizes), "skipped": sorted(self.skipped)}

    @staticmethod
    def merge(states: list[dict]) -> dict:
        """Several ranks' partial epochs as one rank's (a resume at another world size): per step, the loss is the
        size-weighted mean over ranks, correct counts and sizes add up, the grad norm (equal on every rank after the
        all-reduce) is rank 0's. The epoch's totals then reduce to the same values, up to float rounding."""
        if len(states) == 1 or not len(states[0]["losses"]):
            return states[0]
        sizes = torch.tensor([s["sizes"] for s in states], dtype=torch.float64)  # ranks x steps
        losses = torch.stack([s["losses"].double() for s in states])
        return {"losses": ((losses * sizes).sum(0) / sizes.sum(0)).float(),
                "correct": torch.stack([s["correct"] for s in states]).sum(0),
                "grad_norms": states[0]["grad_norms"], "norm_steps": states[0]["norm_steps"],
                "sizes": [int(n) for n in sizes.sum(0).tolist()], "skipped": states[0].get("skipped", [])}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.clear()
        self.losses = list(state["losses"].to(device).unbind())
        self.restored_correct = list(state["correct"].to(device).unbind())
        self.grad_norms = list(state["grad_norms"].to(device).unbind())
        self.norm_steps = list(state["norm_steps"])
        self.sizes = list(state["sizes"])
        self.skipped = set(state.get("skipped", []))  # checkpoints from before mixed precision have none
