"""Live guards: checks on the loop's state, not on its symptoms, each warning once, at the step it happens.

A missing model.train() or optimizer.zero_grad() shows up in the losses only later and ambiguously; the
state that causes it is visible at once. Each check is a few Python attribute reads (the .grad check one
`is not None` per parameter), so the guards are always on. Once a check has fired it is skipped, so a run
with a mistake pays nothing more for it.

Where the loop calls them (train.py's names):

    guards = Guards(warn=print_on_rank0)
    at the start of each epoch, after sampler.set_epoch(epoch):     guards.sampler_epoch(sampler, epoch)
    each step, before the first micro-batch's forward:              guards.before_step(model, params, step)
        (training_forward(model, step) and grads_cleared(params, step) in one call)
    at the start of validation, after its model.eval():             guards.validation_mode(model, epoch)
    summary["instruments"]["guards"] = guards.messages              # [] on a healthy run

`model` is the module that runs (the unwrapped one under DDP: DDP.train()/eval() reach it, but an eval()
on the inner module does not reach the wrapper's flag). Only the top-level flag is read: a submodule put
in eval on purpose (a frozen BatchNorm) is not a mistake.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import torch
from torch import nn


def _print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Guards:
    def __init__(self, warn: Callable[[str], None] = _print_to_stderr) -> None:
        self.warn = warn
        self.messages: list[str] = []  # what summary.json records as instruments.guards
        self._fired: set[str] = set()

    def _fire(self, check: str, message: str) -> None:
        self._fired.add(check)
        message = f"guard {check}: {message}"
        self.messages.append(message)
        self.warn(message)

    def before_step(self, model: nn.Module, params: list[torch.Tensor], step: int) -> None:
        """training_forward and grads_cleared, as one call: on the healthy path, one flag and one .grad per
        parameter (each extra call in the step loop is a visible share of a small model's step). `params` is a
        list, not any iterable: a mistake walks it a second time."""
        if model.training:
            for p in params:
                if p.grad is not None:
                    break
            else:
                return
        self.training_forward(model, step)
        self.grads_cleared(params, step)

    def training_forward(self, model: nn.Module, step: int) -> None:
        """Before a training step's forward: the model must be in train mode."""
        if not model.training and "eval-mode-training" not in self._fired:
            self._fire("eval-mode-training",
                       f"step {step} trains with model.training == False (dropout off, BatchNorm frozen on its "
                       "running statistics). Look at the model.train() line at the start of the epoch's steps: "
                       "validation switches the model to eval mode, so it must run every epoch.")

    def grads_cleared(self, params: Iterable[torch.Tensor], step: int) -> None:
        """Before a step's first backward: every .grad must be None (the loop zeroes with set_to_none=True)."""
        if "grad-not-cleared" not in self._fired and any(p.grad is not None for p in params):
            self._fire("grad-not-cleared",
                       f"step {step} starts with .grad already populated, so its backward adds to the previous "
                       "step's gradients. Look at the optimizer.zero_grad(set_to_none=True) line after "
                       "optimizer.step().")

    def sampler_epoch(self, sampler: object, epoch: int) -> None:
        """At the start of an epoch: DistributedSampler's epoch must be the loop's (it seeds the shuffle).

        Epoch 0 cannot tell a missing set_epoch (the sampler starts at 0): it shows from the second epoch on."""
        sampler_epoch = getattr(sampler, "epoch", epoch)
        if sampler_epoch != epoch and "sampler-epoch" not in self._fired:
            self._fire("sampler-epoch",
                       f"epoch {epoch} starts with the sampler at epoch {sampler_epoch}, so it repeats that "
                       "epoch's shuffle. Look at the sampler.set_epoch(epoch) line at the start of the epoch.")

    def validation_mode(self, model: nn.Module, epoch: int) -> None:
        """At the start of validation: the model must be in eval mode."""
        if model.training and "train-mode-validation" not in self._fired:
            self._fire("train-mode-validation",
                       f"validation after epoch {epoch} runs with model.training == True (dropout on, BatchNorm "
                       "using and updating batch statistics of the validation data). Look at the model.eval() "
                       "line at the start of validation.")
