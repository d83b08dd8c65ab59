"""Per-step bookkeeping that never forces a host sync inside the step.

Values stay on the device as 0-d tensors; they are stacked and reduced once
per epoch (and read at the cheap checkpoints the loop already has).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spine.distributed import DistContext, all_reduce_sum


@dataclass(frozen=True)
class EpochTotals:
    """What every rank agrees on at the end of an epoch, from one all-reduce."""

    loss: float  # global mean train loss
    acc: float  # global train accuracy
    bad_steps: list[float]  # per rank: first global step with a non-finite loss or grad norm, 0 = none
    shard_fingerprints: list[float]  # per rank: fingerprint of the indices it trained on
    rank0_flag: bool  # rank 0's value of `flag`: a decision (e.g. by its clock) every rank must share
    extra: list[float]  # `extra` summed over ranks (e.g. validation's loss sum, correct, count)


class EpochMeter:
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.correct: list[torch.Tensor] = []
        self.grad_norms: list[torch.Tensor] = []
        self.sizes: list[int] = []

    def __len__(self) -> int:
        return len(self.losses)

    def clear(self) -> None:
        """A new epoch: nothing recorded yet."""
        self.losses, self.correct, self.grad_norms, self.sizes = [], [], [], []

    def record(self, loss: torch.Tensor, correct: torch.Tensor, grad_norm: torch.Tensor, size: int) -> None:
        self.losses.append(loss.detach())
        self.correct.append(correct)
        self.grad_norms.append(grad_norm.detach())
        self.sizes.append(size)

    def first_nonfinite(self, start: int = 0) -> int:
        """Index of the first step at or after `start` with a non-finite loss or grad norm, else -1."""
        if start >= len(self.losses):
            return -1
        values = torch.stack([torch.stack(self.losses[start:]), torch.stack(self.grad_norms[start:])])
        bad = (~torch.isfinite(values)).any(0).nonzero()
        return start + int(bad[0]) if len(bad) else -1

    def first_bad_step(self, since: int, last_step: int) -> float:
        """Global step of the first non-finite step from `since` (0 = none), where `last_step` is the global step
        of the last one; +0.5 when only its gradient is bad: DDP spreads one rank's NaN into every rank's
        gradient, so the rank whose *loss* went bad sorts first and is the one named."""
        bad = self.first_nonfinite(since)
        if bad < 0:
            return 0.0
        return last_step - len(self) + bad + 1 + 0.5 * bool(torch.isfinite(self.losses[bad]))

    def end_of_epoch(self, ctx: DistContext, since: int, last_step: int, shard_fingerprint: int,
                     flag: bool, extra: torch.Tensor | None = None) -> EpochTotals:
        """The epoch's global train loss and accuracy (sums and counts over ranks, then one division) and every
        other end-of-epoch agreement, in one all-reduce: each collective is a round trip (about 0.4 ms on gloo
        here, `make scale`'s probe), and several per epoch cost more than a tiny epoch's steps.

        Checks steps from `since` for non-finite values; `last_step` is the global step of the last one.
        Fingerprints must be below 2**53 to survive float64 exactly. `extra` (sums) is reduced along.
        """
        world, rank = ctx.world_size, ctx.rank
        n_extra = 0 if extra is None else len(extra)
        sizes = torch.tensor(self.sizes, dtype=torch.float64, device=ctx.device)
        slots = torch.zeros(3 + 3 * world + n_extra, dtype=torch.float64, device=ctx.device)
        slots[0] = (torch.stack(self.losses).double() * sizes).sum()
        slots[1] = torch.stack(self.correct).double().sum()
        slots[2] = sizes.sum()
        slots[3 + rank] = self.first_bad_step(since, last_step)
        slots[3 + world + rank] = shard_fingerprint
        slots[3 + 2 * world + rank] = float(flag)
        if n_extra:
            slots[3 + 3 * world:] = extra
        values = all_reduce_sum(slots).tolist()
        return EpochTotals(values[0] / values[2], values[1] / values[2], values[3:3 + world],
                           values[3 + world:3 + 2 * world], values[3 + 2 * world] > 0, values[3 + 3 * world:])

    def series(self, start: int = 0) -> tuple[list[float], list[float]]:
        """Per-step losses and grad norms from `start`, as Python floats (one transfer)."""
        if start >= len(self.losses):
            return [], []
        both = torch.stack([torch.stack(self.losses[start:]), torch.stack(self.grad_norms[start:])]).tolist()
        return both[0], both[1]

    def state_dict(self) -> dict:
        if not self.losses:
            return {"losses": torch.zeros(0), "correct": torch.zeros(0), "grad_norms": torch.zeros(0), "sizes": []}
        return {
            "losses": torch.stack(self.losses).cpu(),
            "correct": torch.stack(self.correct).cpu(),
            "grad_norms": torch.stack(self.grad_norms).cpu(),
            "sizes": list(self.sizes),
        }

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
                "grad_norms": states[0]["grad_norms"], "sizes": [int(n) for n in sizes.sum(0).tolist()]}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.losses = list(state["losses"].to(device).unbind())
        self.correct = list(state["correct"].to(device).unbind())
        self.grad_norms = list(state["grad_norms"].to(device).unbind())
        self.sizes = list(state["sizes"])
