"""Checkpointer: save and restore the whole run across ranks.

A checkpoint holds the unwrapped model, optimizer, scheduler, TrainState, every rank's partial-epoch meter and RNG
state, the config and the dataset fingerprint, so a resume continues bit for bit. Rank 0 decides which file to
resume from and writes every save; the other ranks load rank 0's choice and must agree with it, so ranks never
continue from different files (a stale network file system) and never wait for one another forever.
File-level work (atomic writes, loading, picking the newest file) is spine/checkpoint.py's.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from data import fingerprint
from spine import checkpoint as ckpt
from spine.config import Config
from spine.distributed import DistContext, gather_objects, print0
from spine.errors import TrainingError, UsageError
from spine.guard import NonFiniteGuard
from spine.metrics import EpochMeter
from spine.optim import LRSchedule
from spine.state import TrainState


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Checkpointer:
    def __init__(self, cfg: Config, ctx: DistContext, dataset_fingerprint: str, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: LRSchedule,
                 state: TrainState, meter: EpochMeter, scaler: torch.amp.GradScaler | None = None) -> None:
        self.cfg, self.ctx, self.dataset_fingerprint = cfg, ctx, dataset_fingerprint
        self.scaler = scaler  # fp16's loss scale and its growth counter: part of the state a resume must continue
        self.model, self.optimizer, self.scheduler, self.state, self.meter = model, optimizer, scheduler, state, meter
        self.folder = cfg.checkpoint_dir()
        self.before_save: Callable[[], None] = lambda: None  # e.g. flush the logs, so a resume leaves no gap
        self.last_save = time.perf_counter()
        self.instruments: Stateful | None = None  # attach(): built after the restore, saved with the run
        self._saved_instruments: dict = {}  # this rank's part of the resumed checkpoint, until attach()

    # --- restore ------------------------------------------------------------------------------------------------

    def restore(self) -> bool:
        """Continue from a checkpoint (True) or start fresh (False); refuses to overwrite an earlier run silently."""
        ckpt.ensure_writable(self.folder, "--checkpoints-dir")  # fail now, not at the first save an hour in
        ckpt.ensure_writable(self.cfg.run_dir(), "--runs-dir")
        cached: list[dict] = []  # rank 0 loaded the file while choosing it
        decision = [self._choose(cached) if self.ctx.is_main else None]
        if dist.is_initialized():
            dist.broadcast_object_list(decision, src=0)  # also the barrier: all have looked before anyone writes
        kind, payload = decision[0]
        if kind == "usage":
            raise UsageError(payload)
        if kind == "error":
            raise TrainingError(payload)
        if kind == "fresh":
            if self.cfg.overwrite and self.ctx.is_main:
                shutil.rmtree(self.cfg.run_dir(), ignore_errors=True)
                shutil.rmtree(self.folder, ignore_errors=True)
            self.last_save = time.perf_counter()
            return False
        path = Path(payload)
        saved = self._load_agreed(path, cached[0] if cached else None)
        ckpt.check_compatible(saved, self.cfg.to_dict(), self.dataset_fingerprint, self.ctx.world_size)
        saved_precision = saved["config"].get("precision", "fp32")  # checkpoints from before --precision: fp32
        if saved_precision != self.cfg.precision:
            raise UsageError(f"--resume: checkpoint has --precision {saved_precision}, this run has --precision "
                             f"{self.cfg.precision}: resume with it, or start a new run")
        self._load_into_run(saved)
        if self.ctx.is_main:  # no writer is alive at start-up: temp files are what a crashed save left behind
            for leftover in ckpt.clean_temp_files(self.folder):
                print(f"removed {leftover}, left by a checkpoint write that crashed", flush=True)
        print0(f"resumed from {path} at epoch {self.state.epoch}, step {self.state.global_step}")
        self.last_save = time.perf_counter()
        return True

    def _choose(self, cached: list[dict]) -> tuple[str, str | None]:
        """Rank 0's decision: ("fresh" | "resume" | "usage" | "error", a path or a message)."""
        cfg, folder = self.cfg, self.folder
        if cfg.resume == "auto":
            try:
                found = ckpt.load_latest(folder, say=print0)
            except TrainingError as e:
                return "error", str(e)
            if found is None:
                print0(f"--resume auto: no checkpoint in {folder}, starting fresh")
                return "fresh", None
            cached.append(found[0])
            return "resume", str(found[1])
        if cfg.resume:
            path = Path(cfg.resume)
            if not path.is_file():
                return "usage", f"--resume: no checkpoint file at {path}"
            try:
                cached.append(ckpt.load_checkpoint(path))
            except TrainingError as e:
                return "usage", f"--resume: {e}"
            return "resume", str(path)
        existing = [d for d in (cfg.run_dir(), folder) if d.exists() and any(d.iterdir())]
        if existing and not cfg.overwrite:
            return "usage", (f"run {cfg.run_name!r} already exists ({existing[0]}); pass --resume auto to continue "
                             "it, --overwrite to replace it, or another --run-name")
        return "fresh", None

    def _load_agreed(self, path: Path, loaded: dict | None) -> dict:
        """Every rank loads the file rank 0 chose; all must hold the same step and weights, or all stop."""
        error, saved = None, loaded
        if saved is None:
            try:
                saved = ckpt.load_checkpoint(path)
            except TrainingError as e:
                error = str(e)
        seen = None if saved is None else (saved["progress"]["global_step"], fingerprint(*saved["model"].values()))
        views = gather_objects((error, seen), self.ctx)
        for rank, (problem, seen) in enumerate(views):
            if problem:
                raise TrainingError(f"rank {rank} cannot read {path}, the checkpoint rank 0 resumes from: {problem}; "
                                    "every rank must see the same --checkpoints-dir (a file system all nodes share)")
            if seen != views[0][1]:
                raise TrainingError(f"rank {rank} read another {path.name} than rank 0 (step {seen[0]}, weights "
                                    f"{seen[1]} against step {views[0][1][0]}, weights {views[0][1][1]}); every rank "
                                    "must see the same --checkpoints-dir (a stale network file system?)")
        return saved

    def _load_into_run(self, saved: dict) -> None:
        ctx = self.ctx
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(saved["scaler"])
        self.state.load_state_dict(saved["progress"])
        instruments = saved.get("instruments") or [{}]  # checkpoints from before the instruments: none
        self._saved_instruments = instruments[ctx.rank if saved["world_size"] == ctx.world_size else 0]
        if saved["world_size"] == ctx.world_size:  # every rank continues its own partial epoch and RNG stream
            self.meter.load_state_dict(saved["meter"][ctx.rank], ctx.device)
            ckpt.set_rng_state(saved["rng"][ctx.rank])
        else:  # another world size: rank 0 carries the merged partial epoch; new dropout streams per rank
            merged = EpochMeter.merge(saved["meter"])
            self.meter.load_state_dict(merged if ctx.is_main else EpochMeter().state_dict(), ctx.device)
            torch.manual_seed(self.cfg.seed * 1000 + 1 + ctx.rank)

    def attach(self, instruments: Stateful) -> None:
        """Instruments with state of their own (the noise scale's averages): into every checkpoint from now on,
        and the resumed checkpoint's state into them now."""
        self.instruments = instruments
        instruments.load_state_dict(self._saved_instruments)
        self._saved_instruments = {}

    # --- save ---------------------------------------------------------------------------------------------------

    def save(self, guard: NonFiniteGuard, best: bool = False) -> str | None:
        """Rank 0 writes; every rank's RNG state and partial epoch go in. A collective: every rank calls it.

        Never writes non-finite weights: the guard's check (a collective too) runs first; its message is returned
        instead of saving, and the caller stops. None once the checkpoint is on disk."""
        if problem := guard.check_before_save(self.state.global_step):
            return problem
        self.before_save()
        ctx, state = self.ctx, self.state
        rng = gather_objects(ckpt.rng_state(), ctx)
        meters = gather_objects(self.meter.state_dict(), ctx)
        instruments = gather_objects(self.instruments.state_dict() if self.instruments else {}, ctx)
        failure = None
        if ctx.is_main:
            blob = {
                "format": ckpt.FORMAT, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "progress": state.state_dict(), "meter": meters, "rng": rng,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None, "instruments": instruments,
                "config": self.cfg.to_dict(), "world_size": ctx.world_size,
                "dataset_fingerprint": self.dataset_fingerprint, "torch_version": str(torch.__version__),
            }
            try:
                ckpt.save_checkpoint(blob, self.folder, state.global_step, self.cfg.keep_checkpoints, best)
            except TrainingError as e:  # disk full, folder gone: every rank must stop, not wait for rank 0
                failure = str(e)
        # A collective, so also a barrier: nobody runs ahead (or exits) while rank 0 is still writing.
        if failure := gather_objects(failure, ctx)[0]:
            raise TrainingError(failure)
        self.last_save = time.perf_counter()
        return None

    # --- cadence ------------------------------------------------------------------------------------------------

    def due_by_clock(self) -> bool:
        """Rank 0's clock decides for every rank (its value rides in the epoch's all-reduce)."""
        return 0 < self.cfg.checkpoint_every_seconds <= time.perf_counter() - self.last_save

    def due_at_epoch_end(self, rank0_clock: bool) -> bool:
        every = self.cfg.checkpoint_every_epochs
        return bool(every and self.state.epoch % every == 0) or rank0_clock or self.state.epoch == self.cfg.epochs

    def due_at_step(self) -> bool:
        every = self.cfg.checkpoint_every_steps
        return bool(every) and self.state.global_step % every == 0
