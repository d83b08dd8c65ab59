"""Per-step bookkeeping that never forces a host sync inside the step.

Values stay on the device as 0-d tensors; they are stacked and reduced once
per epoch (and read at the cheap checkpoints the loop already has).
"""

from __future__ import annotations

import torch

from spine.distributed import DistContext, all_reduce_sum


class EpochMeter:
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.correct: list[torch.Tensor] = []
        self.grad_norms: list[torch.Tensor] = []
        self.sizes: list[int] = []

    def __len__(self) -> int:
        return len(self.losses)

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

    def reduce(self, ctx: DistContext) -> tuple[float, float]:
        """Global mean loss and accuracy of the epoch: sums and counts over all ranks, then one division."""
        sizes = torch.tensor(self.sizes, dtype=torch.float64, device=ctx.device)
        totals = torch.stack([
            (torch.stack(self.losses).double() * sizes).sum(),
            torch.stack(self.correct).double().sum(),
            sizes.sum(),
        ])
        loss_sum, correct, count = all_reduce_sum(totals).tolist()
        return loss_sum / count, correct / count

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

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.losses = list(state["losses"].to(device).unbind())
        self.correct = list(state["correct"].to(device).unbind())
        self.grad_norms = list(state["grad_norms"].to(device).unbind())
        self.sizes = list(state["sizes"])
