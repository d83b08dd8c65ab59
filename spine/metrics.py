"""Per-step bookkeeping that never forces a host sync inside the step.

Values stay on the device as 0-d tensors; they are stacked and reduced once
per epoch (and read at the cheap checkpoints the loop already has).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from spine.distributed import DistContext, all_reduce_sum


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
    """This rank's steps of the current epoch: loss, predicted classes and labels every step (compared once, when
    the epoch's totals or a checkpoint need them), the grad norm on the steps that measured it (train.py measures it
    on logged steps, and on every step when clipping). A step restored from a checkpoint carries its correct count
    instead of its predictions."""

    def __init__(self) -> None:
        self.clear()

    def __len__(self) -> int:
        return len(self.losses)

    def clear(self) -> None:
        """A new epoch: nothing recorded yet."""
        self.losses: list[torch.Tensor] = []
        self.predicted: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.restored_correct: list[torch.Tensor] = []  # the correct counts of steps loaded from a checkpoint
        self.sizes: list[int] = []
        self.grad_norms: list[torch.Tensor] = []
        self.norm_steps: list[int] = []  # the index of the step each grad norm belongs to
        # Steps the fp16 GradScaler skipped: their gradients were inf or NaN and never reached the weights, so
        # their grad norms are not a divergence (their losses still are: a non-finite loss is never the scaler's).
        self.skipped: set[int] = set()

    def record(self, loss: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor,
               grad_norm: torch.Tensor | None, skipped: bool = False) -> None:
        """One step's values, already detached (a 0-d loss, 1-d predictions and labels, a 0-d norm or None), and
        whether the GradScaler skipped the step."""
        if skipped:
            self.skipped.add(len(self.losses))
        if grad_norm is not None:
            self.grad_norms.append(grad_norm)
            self.norm_steps.append(len(self.losses))
        self.losses.append(loss)
        self.predicted.append(predicted)
        self.labels.append(labels)
        self.sizes.append(labels.shape[0])

    def correct_per_step(self) -> torch.Tensor:
        """Each step's count of correct predictions (restored steps first): a 1-d tensor on the device."""
        fresh = [(p == t).sum() for p, t in zip(self.predicted, self.labels, strict=True)]
        steps = self.restored_correct + fresh
        return torch.stack(steps) if steps else torch.zeros(0, dtype=torch.long)

    def correct_total(self) -> torch.Tensor:
        fresh = (torch.cat(self.predicted) == torch.cat(self.labels)).sum() if self.predicted else 0
        restored = torch.stack(self.restored_correct).sum() if self.restored_correct else 0
        return torch.as_tensor(fresh + restored)

    def any_bad(self, since: int) -> torch.Tensor:
        """Whether a loss or measured grad norm from step index `since` on is not finite: a 0-d tensor on the
        device, the cheap check of the healthy path (first_bad_step says which step, when one is)."""
        values = self.losses[since:] + [v for i, v in self._checked_norms() if i >= since]
        if not values:
            return torch.zeros((), dtype=torch.bool)
        return ~torch.isfinite(torch.stack(values)).all()

    def first_bad_step(self, since: int, last_step: int) -> torch.Tensor:
        """Global step of the first step from index `since` whose loss or measured grad norm is not finite (0 =
        none), where `last_step` is the global step of the last one; +0.5 when only its gradient is bad: DDP
        spreads one rank's NaN into every rank's gradient, so the rank whose *loss* went bad sorts first and is the
        one named. A 0-d tensor on the device: the check rides in a collective and costs no host sync of its own."""
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

        The per-step values come to the host in one transfer and are summed there (each tensor op costs a few
        microseconds, and a 5-step epoch has little else to do). Flags a non-finite value in the steps from
        `since`. The shard fingerprint (hex) travels as its first 13 digits, below 2**53 so float64 holds it exactly.
        `extra` (sums) is reduced along.
        """
        world, rank, n = ctx.world_size, ctx.rank, len(self)
        correct = (torch.cat(self.predicted) == torch.cat(self.labels)).sum().double() if self.predicted else None
        device_values = self.losses + self.grad_norms + ([correct] if correct is not None else [])
        host = torch.stack(device_values).double().tolist() + (extra.tolist() if extra is not None else [])
        losses, norms = host[:n], host[n:n + len(self.grad_norms)]
        correct_total = (host[n + len(norms)] if correct is not None else 0.0) + sum(
            c.item() for c in self.restored_correct)
        checked = losses[since:] + [v for i, v in zip(self.norm_steps, norms, strict=True)
                                    if i >= since and i not in self.skipped]
        bad = float(not all(math.isfinite(v) for v in checked))
        per_rank = [0.0] * (3 * world)
        shard = float(int(shard_fingerprint[:13], 16))
        per_rank[rank], per_rank[world + rank], per_rank[2 * world + rank] = bad, shard, float(flag)
        slots = [sum(v * size for v, size in zip(losses, self.sizes, strict=True)), correct_total,
                 float(sum(self.sizes)), *per_rank, *host[n + len(norms) + (correct is not None):]]
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
        """Per-step losses and grad norms from `start` as Python floats (one transfer); None where a step did not
        measure its grad norm."""
        if start >= len(self.losses):
            return [], []
        values = torch.stack(self.losses[start:] + self.grad_norms).tolist()
        losses, norms = values[:len(self) - start], values[len(self) - start:]
        per_step: list[float | None] = [None] * (len(self) - start)
        for i, v in zip(self.norm_steps, norms, strict=True):
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
