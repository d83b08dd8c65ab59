"""Precision: fp32, or bf16 / fp16 through torch.autocast, with a GradScaler for fp16.

fp32 is no autocast at all (a null context and plain backward/step), so a run at fp32 trains bit for bit as before
mixed precision existed. bf16 has fp32's exponent range and needs no loss scaling. fp16 does: small gradients
underflow to zero in fp16, so the loss is multiplied by a scale before backward and the gradients divided by it
before the step; a step whose gradients came out inf or NaN is skipped by the scaler, which halves the scale. Such
a skipped step is the scaler doing its job, not a divergence: `step` reports it so the non-finite guard can tell the
two apart (spine/metrics.py).

torch.autocast does not fail on a dtype its device cannot run: it warns and runs in fp32. `Precision` checks by
running one small matmul under autocast and refuses (UsageError, one line) when the result is not in the dtype
asked for, so a run never claims a precision it did not use. In torch 2.13 CPU autocast supports both bf16 and fp16.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from spine.distributed import NO_CONTEXT
from spine.errors import UsageError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a matmul under torch.autocast(device, dtype) really comes out in `dtype` on this device."""
    if not torch.amp.autocast_mode.is_autocast_available(device.type):
        return False
    a = torch.ones(4, 4, device=device)
    with warnings.catch_warnings():  # autocast warns, then silently falls back to fp32: we check the result instead
        warnings.simplefilter("ignore")
        try:
            with torch.autocast(device.type, dtype=dtype):
                return (a @ a).dtype == dtype
        except RuntimeError:
            return False


class Precision:
    """The autocast context of forward passes, the loss scaling of backward and the (possibly skipped) step."""

    def __init__(self, name: str, device: torch.device, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.name, self.device, self.optimizer = name, device, optimizer
        self.dtype = DTYPES.get(name)
        if self.dtype is not None and not autocast_runs(device, self.dtype):
            raise UsageError(f"--precision {name}: torch {torch.__version__} cannot run autocast in {name} on "
                             f"{device.type}; use --precision fp32" + (" or bf16" if name == "fp16" else ""))
        # Only fp16 needs a scaler: bf16 keeps fp32's exponent range, so its gradients do not underflow.
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
        if self.scaler:  # a skipped first step makes the scheduler warn it stepped before the optimizer: expected
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")

    def autocast(self) -> contextlib.AbstractContextManager:
        """Forward passes (and the loss) in the reduced precision; a no-op at fp32."""
        if self.dtype is None:
            return NO_CONTEXT
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), of the scaled loss under fp16."""
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self) -> None:
        """Divide the gradients by the scale, so the grad norm and clipping see the true gradients."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)

    def step(self) -> bool:
        """optimizer.step(); under fp16 the scaler's, which skips a step whose gradients are not finite. Returns
        whether the step was skipped. The scaler lowers its scale exactly when it skipped (backoff 0.5; growth only
        raises it), so comparing the scale before and after is the skip flag (a host sync, fp16 only)."""
        if not self.scaler:
            self.optimizer.step()
            return False
        before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return self.scaler.get_scale() < before
