"""TrainState: where the run is and what it has reached so far. Saved in every checkpoint, so a resume continues
the same counters, milestones and best checkpoint."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # optimizer steps done in the current epoch (a mid-epoch checkpoint has > 0)
    global_step: int = 0
    elapsed_before: float = 0.0  # seconds trained by earlier attempts of this run
    initial_loss: float | None = None  # train loss at initialisation (expect ln K)
    first_step_loss: float | None = None
    best: dict = field(default_factory=lambda: {"val_loss": math.inf, "val_acc": None, "epoch": None, "step": None})
    milestones: dict = field(default_factory=lambda: {"epochs_to_100_train_acc": None, "steps_to_100_train_acc": None,
                                                      "epochs_to_target_loss": None, "steps_to_target_loss": None})
    final: dict | None = None  # the last completed epoch's train and validation loss and accuracy
    started: float = field(default_factory=time.perf_counter, compare=False)  # this attempt's clock: not saved

    def elapsed(self) -> float:
        """Seconds trained over every attempt of the run."""
        return self.elapsed_before + time.perf_counter() - self.started

    def end_epoch(self, row: dict, target_loss: float) -> None:
        """Record a completed epoch's metrics and the milestones it reached first."""
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        if self.first_step_loss is None:
            self.first_step_loss = row["step_losses"][0]
        self.final = {k: row[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc")}
        m = self.milestones
        if row["train_acc"] == 1.0 and m["epochs_to_100_train_acc"] is None:
            m["epochs_to_100_train_acc"], m["steps_to_100_train_acc"] = self.epoch, self.global_step
        if row["train_loss"] <= target_loss and m["epochs_to_target_loss"] is None:
            m["epochs_to_target_loss"], m["steps_to_target_loss"] = self.epoch, self.global_step

    def improves_best(self, val_loss: float, val_acc: float) -> bool:
        """Whether a checkpoint saved now becomes best.pt (lowest validation loss among saved ones)."""
        if not val_loss < self.best["val_loss"]:
            return False
        self.best = {"val_loss": val_loss, "val_acc": val_acc, "epoch": self.epoch, "step": self.global_step}
        return True

    def state_dict(self) -> dict:
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "started"}
        state["elapsed"] = self.elapsed()  # what the next attempt starts from
        del state["elapsed_before"]
        return state

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])
        self.elapsed_before = state["elapsed"]
        self.started = time.perf_counter()
