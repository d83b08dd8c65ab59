"""NonFiniteGuard: stop every rank at the same point when a loss, gradient or weight stops being finite.

Each check is a collective that every rank runs on every path, so a NaN on one rank can never leave the others
waiting in the next collective. Values stay on the device between checks: a check is the only host sync.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from spine.distributed import DistContext, all_reduce_sum, start_all_reduce_sum
from spine.metrics import EpochMeter


def non_finite_message(bad_steps: list[float]) -> str | None:
    """The first non-finite step over all ranks (0 = none on that rank, +0.5 = only the gradient), or None."""
    if not any(bad_steps):
        return None
    first = min(s for s in bad_steps if s)
    return f"non-finite {'gradient' if first % 1 else 'loss'} at step {int(first)} on rank {bad_steps.index(first)}"


class PendingCheck(NamedTuple):
    """A --log-every check at world > 1 whose all-reduce is under way."""

    flags: torch.Tensor  # per rank, summed in place by the all-reduce
    work: dist.Work
    since: int  # the first step index (in this epoch's meter) it covers


class NonFiniteGuard:
    """The healthy path costs one small all-reduce of per-rank flags; only when a flag is up does a second
    collective find the first bad step and its rank (every rank takes that path together: the flags are reduced).

    At world > 1 the all-reduce of `check_steps` is started at the check and read at the next one (or at the
    epoch's end, or before a save, whichever comes first), so its round trip overlaps the steps in between instead
    of being waited for on the logged step. The price is one interval: a run stops one --log-every later than at
    world 1, at the same step on every rank, naming the same first bad step, and a checkpoint is never written
    from unchecked steps (`check_before_save` reads the answer first)."""

    def __init__(self, ctx: DistContext, params: list[torch.nn.Parameter], meter: EpochMeter) -> None:
        self.ctx, self.params, self.meter = ctx, params, meter
        self.checked = len(meter)  # steps of this epoch already checked or in a check (a resume starts past some)
        self._pending: PendingCheck | None = None  # world > 1: the last check, not read yet

    def check_steps(self, global_step: int) -> str | None:
        """Collective: the first non-finite loss or gradient on any rank, since the last check (world 1) or up to
        the previous check, whose answer this one reads (world > 1)."""
        if self.ctx.world_size == 1:
            return self._check(global_step, with_params=False)
        if problem := self._read_pending(global_step):
            return problem
        flags = self._rank_slots(float(self.meter.any_bad(self.checked)))
        self._pending = PendingCheck(flags, start_all_reduce_sum(flags), self.checked)
        self.checked = len(self.meter)
        return None

    def check_before_save(self, global_step: int) -> str | None:
        """Collective: as check_steps, and the weights themselves, in the same all-reduce; answered now."""
        return self._read_pending(global_step) or self._check(global_step, with_params=True)

    def _read_pending(self, global_step: int) -> str | None:
        """The answer of the check started earlier (world > 1), if one is out; every rank reads the same flags."""
        if self._pending is None:
            return None
        pending, self._pending = self._pending, None
        pending.work.wait()
        return self._locate(pending.since, global_step) if any(pending.flags.tolist()) else None

    @staticmethod
    def check_validation(val_loss: float, epoch: int) -> str | None:
        """The weights can go non-finite after the last checked step; validation, reduced over ranks, shows it."""
        if math.isfinite(val_loss):
            return None
        return (f"non-finite validation loss after epoch {epoch}: the weights went non-finite after the last "
                "checked step (--log-every 1 checks the gradient of every step)")

    def end_of_epoch(self, bad: list[float], global_step: int) -> str | None:
        """The epoch's all-reduce carried the flags of its unchecked steps (`bad`, per rank); a check still out is
        read first. The next epoch starts unchecked."""
        problem = self._read_pending(global_step) or (self._locate(self.checked, global_step) if any(bad) else None)
        self.checked = 0
        return problem

    def _check(self, global_step: int, with_params: bool) -> str | None:
        flag = float(self.meter.any_bad(self.checked))  # 1: a step; +2: the weights
        if with_params:
            flag += 2.0 * (not torch.stack([torch.isfinite(p).all() for p in self.params]).all().item())
        flags = self._per_rank(flag)
        problem = self._locate(self.checked, global_step) if any(f % 2 for f in flags) else None
        self.checked = len(self.meter)
        if problem is None and any(f >= 2 for f in flags):
            problem = f"non-finite parameters at step {global_step}"
        return problem

    def _locate(self, since: int, global_step: int) -> str | None:
        """Second collective, failure path only: every rank's first bad step from step index `since` on."""
        return non_finite_message(self._per_rank(self.meter.first_bad_step(since, global_step).item()))

    def _per_rank(self, value: float) -> list[float]:
        """Every rank's `value`, in rank order: one small all-reduce (none at world 1)."""
        if self.ctx.world_size == 1:
            return [value]
        return all_reduce_sum(self._rank_slots(value)).tolist()

    def _rank_slots(self, value: float) -> torch.Tensor:
        """One slot per rank, zero but this rank's, which holds `value`: summed over ranks, every rank's value."""
        slots = torch.zeros(self.ctx.world_size, dtype=torch.float64, device=self.ctx.device)
        slots[self.ctx.rank] = value
        return slots
