"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural Networks").

Train for a short run while the lr grows exponentially from lr_min to lr_max; the loss falls, then blows up.
LRRangeTest is only the bookkeeping: the loop asks it for the lr of each step and feeds back that step's
loss. It never touches the model, so the caller must save the model and optimizer state before the test and
load them after it (the test's steps are not meant to be kept), and isolate the RNG if the run continues.

    finder = LRRangeTest(lr_min=1e-7, lr_max=10, num_steps=100)
    while (lr := finder.next_lr) is not None:
        for group in optimizer.param_groups: group["lr"] = lr
        loss = ... one training step ...
        loss = all_reduce_sum(loss.detach().clone()) / world   # every rank feeds the same number
        if finder.record(lr, loss.item()):                     # so every rank stops at the same step
            break
    finder.suggestion(); plot_lr_range(finder, run_dir / "lr_find.png")

Rules, stated:
- schedule: lr_i = lr_min * (lr_max / lr_min) ** (i / (num_steps - 1)), i = 0 .. num_steps - 1; the two ends
  are exactly lr_min and lr_max.
- stop: as soon as the smoothed loss exceeds diverge_factor (4) x the lowest smoothed loss so far, or the loss
  is not finite. The smoothed loss is an exponential moving average with bias correction, online (causal),
  so the decision can be taken at the step.
- suggestion: the lr where the loss falls fastest against log lr, taken before the minimum: on the losses
  recorded until the stop, smoothed by a centred moving average of +-window points (no lag, unlike the
  causal average, whose lag would shift the suggestion towards the blow-up), the point with the most
  negative central-difference slope d(loss)/d(log10 lr) among the points before that curve's minimum. None
  when the loss never fell.
"""

from __future__ import annotations

import math
from pathlib import Path

LR_FIND_RULE = "steepest fall of the smoothed loss against log10(lr), before the loss's minimum"


class LRRangeTest:
    def __init__(self, lr_min: float = 1e-7, lr_max: float = 10.0, num_steps: int = 100,
                 smoothing: float = 0.9, diverge_factor: float = 4.0, window: int = 3) -> None:
        if not 0 < lr_min < lr_max:
            raise ValueError(f"need 0 < lr_min < lr_max, got {lr_min}, {lr_max}")
        if num_steps < 2:
            raise ValueError("num_steps must be at least 2 (both ends of the range)")
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.lr_min, self.lr_max, self.num_steps = lr_min, lr_max, num_steps
        self.smoothing, self.diverge_factor, self.window = smoothing, diverge_factor, window
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []  # the online, bias-corrected moving average the stop rule reads
        self.stop_reason: str | None = None
        self._average = 0.0
        self._best = math.inf

    def lr_at(self, step: int) -> float:
        """The schedule: geometric from lr_min (step 0) to lr_max (step num_steps - 1), both ends exact."""
        if step == self.num_steps - 1:
            return self.lr_max  # the power below can land an ulp off lr_max
        return self.lr_min * (self.lr_max / self.lr_min) ** (step / (self.num_steps - 1))

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    @property
    def next_lr(self) -> float | None:
        """The lr for the next step, or None once the test is over."""
        return None if self.done else self.lr_at(len(self.losses))

    def record(self, lr: float, loss: float) -> bool:
        """The loss of the step just taken at `lr`; returns whether to stop. Feed every rank the same (reduced)
        loss: the decision then is the same on every rank and no rank is left waiting in a collective."""
        if self.done:
            raise RuntimeError(f"the range test is over ({self.stop_reason})")
        loss = float(loss)
        self.lrs.append(float(lr))
        self.losses.append(loss)
        if not math.isfinite(loss):
            self.smoothed.append(math.nan)
            self.stop_reason = f"non-finite loss at lr {lr:.3g}"
            return True
        self._average = self.smoothing * self._average + (1 - self.smoothing) * loss
        # Bias correction: the average starts at 0, so early values are divided by the weight they have.
        smoothed = self._average / (1 - self.smoothing ** (len(self.smoothed) + 1))
        self.smoothed.append(smoothed)
        self._best = min(self._best, smoothed)
        if smoothed > self.diverge_factor * self._best:
            self.stop_reason = (f"smoothed loss {smoothed:.4g} > {self.diverge_factor:g} x best {self._best:.4g} "
                                f"at lr {lr:.3g}")
        elif len(self.losses) == self.num_steps:
            self.stop_reason = "reached lr_max"
        return self.done

    def centred_losses(self) -> list[float]:
        """The recorded finite losses, each replaced by the mean of the +-window points around it."""
        finite = [loss for loss in self.losses if math.isfinite(loss)]
        w = self.window
        return [sum(finite[max(0, i - w):i + w + 1]) / len(finite[max(0, i - w):i + w + 1])
                for i in range(len(finite))]

    def suggestion(self) -> float | None:
        """The lr of steepest descent of the centred smoothed loss against log lr, before its minimum."""
        curve = self.centred_losses()
        logs = [math.log10(lr) for lr in self.lrs[:len(curve)]]
        if len(curve) < 3:
            return None
        lowest = min(range(len(curve)), key=curve.__getitem__)
        # Central differences at the interior points before the minimum.
        slopes = {i: (curve[i + 1] - curve[i - 1]) / (logs[i + 1] - logs[i - 1])
                  for i in range(1, min(lowest, len(curve) - 1))}
        if not slopes:
            return None
        steepest = min(slopes, key=slopes.__getitem__)
        return self.lrs[steepest] if slopes[steepest] < 0 else None

    def summary(self) -> dict:
        """Plain values for summary.json."""
        return {"suggestion": self.suggestion(), "stop_reason": self.stop_reason, "steps": len(self.losses),
                "lr_min": self.lr_min, "lr_max": self.lr_max}


def plot_lr_range(test: LRRangeTest, path: str | Path, title: str = "LR range test") -> Path:
    """Loss against lr (log x axis): raw losses, the curve the suggestion reads, the suggestion marked. PNG."""
    # The Agg canvas directly: no pyplot, so no global backend switch and no figure left open in the process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    curve = test.centred_losses()
    ax.plot(test.lrs, test.losses, color="0.7", lw=1, label="loss")
    ax.plot(test.lrs[:len(curve)], curve, color="C0", lw=2, label=f"centred mean (+-{test.window} steps)")
    suggested = test.suggestion()
    if suggested is not None:
        ax.axvline(suggested, color="C3", ls="--", lw=1.2, label=f"suggestion {suggested:.3g}")
    ax.set_xscale("log")
    finite = [v for v in test.losses if math.isfinite(v)]
    if finite:  # the blow-up would squash the interesting part of the curve against the bottom
        low = min(finite)
        ax.set_ylim(low - 0.05 * abs(low), 1.05 * max(curve[0], test.diverge_factor * low))
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(title + (f" ({test.stop_reason})" if test.stop_reason else ""), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
