"""NonFiniteGuard: stop every rank at the same point when a loss, gradient or weight stops being finite.

Each check is a collective that every rank runs on every path, so a NaN on one rank can never leave the others
waiting in the next collective. Values stay on the device between checks: a check is the only host sync.
"""

from __future__ import annotations

import torch

from spine.distributed import DistContext, all_reduce_sum
from spine.metrics import EpochMeter


def non_finite_message(bad_steps: list[float]) -> str | None:
    """The first non-finite step over all ranks (0 = none on that rank, +0.5 = only the gradient), or None."""
    if not any(bad_steps):
        return None
    first = min(s for s in bad_steps if s)
    return f"non-finite {'gradient' if first % 1 else 'loss'} at step {int(first)} on rank {bad_steps.index(first)}"


class NonFiniteGuard:
    def __init__(self, ctx: DistContext, params: list[torch.nn.Parameter], meter: EpochMeter) -> None:
        self.ctx, self.params, self.meter = ctx, params, meter
        self.checked = len(meter)  # steps of this epoch already checked (a mid-epoch resume starts past some)

    def check_steps(self, global_step: int) -> str | None:
        """Collective: the first non-finite loss or gradient since the last check, on any rank."""
        return self._reduce(global_step, with_params=False)

    def check_before_save(self, global_step: int) -> str | None:
        """Collective: as check_steps, and the weights themselves, in the same all-reduce."""
        return self._reduce(global_step, with_params=True)

    def end_of_epoch(self, bad_steps: list[float]) -> str | None:
        """The epoch's all-reduce already carried the check of its last steps; the next epoch starts unchecked."""
        self.checked = 0
        return non_finite_message(bad_steps)

    def _reduce(self, global_step: int, with_params: bool) -> str | None:
        world, rank = self.ctx.world_size, self.ctx.rank
        slots = torch.zeros(2 * world, dtype=torch.float64, device=self.ctx.device)
        slots[rank] = self.meter.first_bad_step(self.checked, global_step)
        if with_params:
            finite = torch.stack([torch.isfinite(p).all() for p in self.params]).all()
            slots[world + rank] = (~finite).double()
        values = all_reduce_sum(slots).tolist()
        self.checked = len(self.meter)
        problem = non_finite_message(values[:world])
        if problem is None and any(values[world:]):
            problem = f"non-finite parameters at step {global_step}"
        return problem
