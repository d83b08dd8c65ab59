"""The training step reads nothing back to the host: on a GPU every such read waits for the device to finish.

There is no device to wait for on the CPU, so the test watches the calls themselves. A TorchFunctionMode sees every
torch function and Tensor method that Python code calls; the step, from Instruments.step_start to EpochMeter.record,
must make none of the calls that copy a tensor's value to the host (.item(), .tolist(), bool(t), .cpu(), a boolean
mask, ...). The --log-every check and the epoch's end, after record, read values on purpose, and the test also
checks that the mode sees those reads, so it is known to be able to see them.

One read of torch's is left out: the optimizers' `_get_value`, by which Adam reads its step counter with .item(); that
counter is a CPU tensor even when the parameters are on a GPU (it is moved to the device only with capturable=True
or fused=True).
"""

from __future__ import annotations

import contextlib
import io
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import train
from spine.distributed import distributed_session
from spine.instruments.loop import Instruments
from spine.metrics import EpochMeter

# Calls that need a tensor's value on the host: on a GPU, each one waits for the device.
HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__format__", "__repr__", "__str__",
              "__contains__", "numpy", "cpu", "is_nonzero", "equal", "allclose", "nonzero", "unique", "masked_select",
              "__array__"}


def reads_host(func, args: tuple, kwargs: dict) -> bool:
    name = getattr(func, "__name__", "")
    if name in HOST_READS:
        return True
    if name == "to":  # .to("cpu") copies to the host. A torch.device target is taken as the run's own device: on
        # the CPU the two cannot be told apart (torch's clipping moves its coefficient to each gradient's device).
        target = args[1] if len(args) > 1 else kwargs.get("device")
        return isinstance(target, str) and torch.device(target).type == "cpu"
    if name == "__getitem__":  # a boolean mask's result has a data-dependent size
        index = args[1] if len(args) > 1 else None
        indices = index if isinstance(index, tuple) else (index,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
    return False


class HostReads(TorchFunctionMode):
    """Records each host read as (the step that started last, inside its body?, call name); 0 before the first."""

    def __init__(self) -> None:
        super().__init__()
        self.step, self.in_step = 0, False
        self.reads: list[tuple[int, bool, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        caller = sys._getframe(1).f_code
        if reads_host(func, args, kwargs) and not (caller.co_name == "_get_value" and "torch/optim/" in
                                                   caller.co_filename):
            self.reads.append((self.step, self.in_step, func.__name__))
        return func(*args, **kwargs)


@pytest.mark.parametrize("flags", [[], ["--grad-clip", "1.0", "--grad-accum-steps", "2", "--batch-size", "8"]],
                         ids=["default", "clip-and-accumulation"])
def test_the_step_reads_nothing_to_the_host_and_the_checks_do(tmp_path, monkeypatch, flags):
    mode = HostReads()
    step_start, record = Instruments.step_start, EpochMeter.record

    def start(self, step):
        mode.step, mode.in_step = step, True
        step_start(self, step)

    def recorded(self, *args, **kwargs):
        record(self, *args, **kwargs)
        mode.in_step = False

    monkeypatch.setattr(Instruments, "step_start", start)
    monkeypatch.setattr(EpochMeter, "record", recorded)
    argv = ["--epochs", "4", "--log-every", "3", "--runs-dir", str(tmp_path / "runs"),
            "--checkpoints-dir", str(tmp_path / "ckpt"), "--threads", "1", *flags]
    with distributed_session("cpu", 1, 60.0) as ctx, contextlib.redirect_stdout(io.StringIO()), mode:
        assert train.run(argv, ctx) == 0
    assert [name for _, in_step, name in mode.reads if in_step] == []
    # The --log-every check after step 3, mid-epoch (5 steps per epoch), reads on purpose: the watch sees it.
    assert "tolist" in [name for step, in_step, name in mode.reads if step == 3 and not in_step]
