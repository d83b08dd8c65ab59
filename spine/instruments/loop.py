"""The instruments as the training loop sees them: one object, called at five points of train.py.

    instruments = Instruments(cfg, ctx, model, optimizer, data, logger, steps_per_epoch)
    each epoch, after sampler.set_epoch:        instruments.epoch_start(sampler, epoch)
    each step, before forward_backward:         instruments.step_start(step)          (step counts from 1)
    around each micro-batch's backward:         with instruments.backward_context(micro, step_batch): loss.backward()
                                                (backward_context is None when no instrument wraps a backward)
    after the grad norm, before clipping:       instruments.before_update(step, grad_norm, step_batch)
    after scheduler.step():                     instruments.after_update(step)
    after validation:                           instruments.validated(model, epoch)
    summary.json:                               instruments.summary()

Only the live guards are always on (a few attribute reads per step). Every other instrument is None unless its
flag asks for it, and none of them changes what training computes: they read weights and gradients, run their
own forwards in eval mode with the RNG forked (sharpness), and read gradients from parameter hooks that exist
only during a measured backward (noise scale). The non-main ranks take part in every collective but log nothing.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from spine.distributed import DistContext, all_reduce_sum
from spine.instruments.guards import Guards
from spine.instruments.layer_stats import LayerStats
from spine.instruments.noise_scale import DDPGradNoise, DeferredFlush, MicroBatchGradNoise, NoiseScaleEstimator
from spine.instruments.sharpness import top_hessian_eigenvalue

if TYPE_CHECKING:  # annotations only: the loop's own types, no import at run time
    from data import SplitDataset
    from spine.config import Config
    from spine.logger import RunLogger


class Instruments:
    def __init__(self, cfg: Config, ctx: DistContext, model: nn.Module, optimizer: torch.optim.Optimizer,
                 data: SplitDataset, logger: RunLogger, steps_per_epoch: int) -> None:
        self.ctx, self.model, self.optimizer, self.logger = ctx, model, optimizer, logger
        self.log_every, self.steps_per_epoch = cfg.log_every, steps_per_epoch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.all_reduce = all_reduce_sum if ctx.world_size > 1 else None
        self.guards = Guards(warn=self._warn)
        # "per_layer" sorts after loss/ and accuracy/, which TensorBoard then opens on
        self.layer_stats = LayerStats(model, prefix="per_layer") if cfg.layer_stats else None
        self.histograms_every = cfg.histograms_every
        self.sharpness_every, self.sharpness = cfg.sharpness_every, []
        if self.sharpness_every:
            # The first N training samples, shared out over the ranks; the HVPs are summed over them.
            n = min(cfg.sharpness_samples, len(data.train_x))
            self.curvature_x = data.train_x[:n][ctx.rank::ctx.world_size]
            self.curvature_y = data.train_y[:n][ctx.rank::ctx.world_size]
        self.noise, self.noise_estimate = None, None
        # The logged steps compute the grad norm anyway: measured on those, the noise scale costs the least.
        self.noise_every = cfg.noise_scale_every or cfg.log_every
        if cfg.noise_scale:
            self.noise_estimate = NoiseScaleEstimator()
            if ctx.world_size > 1:  # per-rank batch against the all-reduced one, read before DDP writes it back
                self.noise = DDPGradNoise(self.params)
            else:  # one micro-batch against the step's k
                self.noise = MicroBatchGradNoise(self.params)
            self.noise_flush = DeferredFlush(self.noise, self.noise_estimate, ctx.device)  # no rank waits on it
        # Whether the current step needs the grad norm: the noise scale's big-batch gradient, when it measures.
        self.needs_grad_norm = False
        # None: no backward to wrap, so forward_backward takes its plain path (train.py).
        self.backward_context = self._backward if self.noise is not None else None
        # With no instrument's flag set (the default), the per-step hooks return after the guards: on a small model
        # each call and check of theirs is a visible part of the step.
        self.optional = bool(self.layer_stats or self.noise is not None or self.sharpness_every
                             or self.histograms_every)

    def _warn(self, message: str) -> None:
        if self.ctx.is_main:  # every rank sees the same state; one voice is enough
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def epoch_start(self, sampler: object, epoch: int) -> None:
        self.guards.sampler_epoch(sampler, epoch)

    def step_start(self, step: int) -> None:
        """Before step `step` (1-based) runs its first forward."""
        self.guards.before_step(self.model, self.params, step)
        if not self.optional:
            return
        if self.noise is not None:  # by the global step, so a resumed run measures the same steps
            self.noise.measure = self.needs_grad_norm = step % self.noise_every == 0
        if self.sharpness_every and (step - 1) % self.sharpness_every == 0:
            self._measure_sharpness(step - 1)
        if self.layer_stats and step % self.log_every == 0:  # after the sharpness: its forwards are not the step's
            self.layer_stats.begin_step()

    def _backward(self, micro_batch: int, step_batch: int) -> contextlib.AbstractContextManager:
        """Wraps one micro-batch's backward: the noise scale's small-batch gradient, on a step it measures."""
        if isinstance(self.noise, MicroBatchGradNoise):
            return self.noise.micro_batch(weight=micro_batch / step_batch, size=micro_batch)
        return self.noise.backward()  # DDPGradNoise

    def before_update(self, step: int, grad_norm: torch.Tensor | None, step_batch: int) -> None:
        """After the step's last backward and its grad norm, before clipping and optimizer.step()."""
        if not self.optional:
            return
        if self.layer_stats and self.layer_stats.active:
            self.layer_stats.before_optimizer_step()
        if isinstance(self.noise, DDPGradNoise):
            self.noise.step_done(grad_norm, b_small=step_batch, b_big=step_batch * self.ctx.world_size)
        elif self.noise is not None:
            self.noise.step_done(grad_norm)
        epoch_ends = step % self.steps_per_epoch == 0
        if self.histograms_every and epoch_ends and (step // self.steps_per_epoch) % self.histograms_every == 0:
            self._histograms(step)

    def after_update(self, step: int) -> None:
        """After optimizer.step() and scheduler.step() of step `step`."""
        if not self.optional:
            return
        if self.layer_stats and self.layer_stats.active:
            self.logger.scalars(step, self.layer_stats.end_step(self.all_reduce))  # a collective at world > 1
        if self.noise is not None and step % self.log_every == 0:
            self._log_noise(self.noise_flush.flush(step))  # a collective, started here and read at the next one

    def _log_noise(self, step: int | None) -> None:
        """The estimator's value once the estimate up to `step` is in (None: nothing came in)."""
        if step is not None:
            result = self.noise_estimate.result()
            self.logger.scalars(step, {f"noise/{k}": v for k, v in result.items() if v is not None})

    def validated(self, model: nn.Module, epoch: int) -> bool:
        """After validation's forwards: whether it ran in eval mode (a guard warns if not)."""
        self.guards.validation_mode(model, epoch)
        return not model.training

    def _measure_sharpness(self, steps_taken: int) -> None:
        value = top_hessian_eigenvalue(self.model, F.cross_entropy, self.curvature_x, self.curvature_y,
                                       batch_size=4096, all_reduce=self.all_reduce)
        lr = self.optimizer.param_groups[0]["lr"]
        self.sharpness.append([steps_taken, value])
        # Gradient descent on a quadratic diverges once lr x sharpness > 2; the two curves share a chart.
        self.logger.scalars(steps_taken, {"sharpness/lambda_max": value, "sharpness/2_over_lr": 2 / lr if lr else 0.0})

    def _histograms(self, step: int) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for name, p in self.model.named_parameters():
            tensors[f"weights/{name}"] = p
            if p.grad is not None:
                tensors[f"grads/{name}"] = p.grad
        self.logger.histograms(step, tensors)

    def summary(self) -> dict:
        """summary.json's `instruments`: the guards' messages ([] when healthy); the others when switched on.
        Every rank calls it: it completes the noise scale's last all-reduce."""
        if self.noise is not None:
            self._log_noise(self.noise_flush.finish())
        return {"guards": list(self.guards.messages),
                "sharpness": self.sharpness if self.sharpness_every else None,
                "noise_scale": self.noise_estimate.result() if self.noise_estimate else None}

    def state_dict(self) -> dict:
        """This rank's part of a checkpoint: the noise scale's smoothed estimates (the same on every rank) and
        the sums its source holds for the next flush (this rank's own). Every rank calls it at the same step
        (Checkpointer.save); the flush started last is completed first, as the next flush would have done."""
        if self.noise is None:
            return {}
        self._log_noise(self.noise_flush.finish())
        return {"noise_scale": {"estimator": self.noise_estimate.state_dict(), "source": self.noise.state_dict(),
                                "world_size": self.ctx.world_size}}

    def load_state_dict(self, state: dict) -> None:
        """A resume: continue the noise scale's estimates, and its unflushed sums if the world size is the same
        (another world size measures other batch sizes: those sums are dropped)."""
        saved = state.get("noise_scale")
        if self.noise is None or not saved:
            return
        self.noise_estimate.load_state_dict(saved["estimator"])
        if saved["world_size"] == self.ctx.world_size:
            self.noise.load_state_dict(saved["source"], self.ctx.device)

    def close(self) -> None:
        if self.layer_stats:
            self.layer_stats.remove()


