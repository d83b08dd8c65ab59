"""Where the numbers go, and how to read them back: the console (rank 0 only), TensorBoard, metrics.jsonl,
summary.json and config.toml under <runs-dir>/<run-name>/.

Only rank 0 writes anything; the other ranks hold a logger that does nothing, so the loop calls it
unconditionally. `read_run` is the reader of the files RunLogger writes.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from spine.metrics import EpochMeter

if TYPE_CHECKING:  # annotations only: tensorboard's protos load when TensorBoard is on
    from tensorboard.compat.proto.summary_pb2 import SummaryMetadata
    from tensorboard.plugins.hparams import plugin_data_pb2

# The scalars are written to the event file, and flushed, in batches: at the first logging call this long after the
# previous batch, and before every checkpoint (SummaryWriter's own thread flushed every 120 s).
TB_HANDOFF_SECONDS = 10.0
# An epoch's row joins the event of the step that just logged only if that step's scalars are this recent: the
# event's wall time is the first scalars', and TensorBoard's wall-time axis should not move by a validation pass.
MERGE_SECONDS = 1.0
# metrics.jsonl reaches the disk at least this often, and always before a checkpoint (RunLogger.flush): epochs lost
# in a crash after that are the ones a resume trains again, and it truncates the file to its checkpoint anyway.
FLUSH_SECONDS = 1.0
# The default console cadence (--print-every 0): an epoch line about this often, the first and the last always.
PRINT_SECONDS = 1.0

# TensorBoard's Custom Scalars dashboard: train and validation on one chart.
CUSTOM_SCALARS = {"train vs val": {"loss": ["loss/train", "loss/val"], "accuracy": ["accuracy/train", "accuracy/val"]}}

COLUMNS = [
    # (header, width, format)
    ("epoch", 6, "{:>6}"),
    ("step", 8, "{:>8}"),
    ("train_loss", 11, "{:>11.4g}"),
    ("train_acc", 9, "{:>8.2%} "),
    ("val_loss", 10, "{:>10.4g}"),
    ("val_acc", 8, "{:>7.2%} "),
    ("lr", 9, "{:>9.3g}"),
    ("grad_norm", 9, "{:>9.3g}"),
    ("samples/s", 10, "{:>10,.0f}"),
    ("elapsed", 8, "{:>8}"),
    ("eta", 8, "{:>8}"),
]


def fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, purge_step: int | None,
                 keep_epochs: int, epochs: int = 0, print_every: int = 0) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.epochs, self.print_every = epochs, print_every  # the console's epoch lines and their ETA
        self._started, self._first_epoch = time.perf_counter(), keep_epochs
        self._last_epoch_logged = self._last_flush = self._started
        self._last_printed: float | None = None  # when the last epoch line went to the console
        self.writer = None
        self._pending: list = []  # (step, [(tag, value)], walltime) not yet handed to the TensorBoard writer
        self._last_handoff = time.perf_counter()
        self._rows_printed = 0
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_metrics(keep_epochs)
        self.metrics_file = open(run_dir / "metrics.jsonl", "a")
        if tensorboard:
            from spine.event_file import EventFile, custom_scalars

            # purge_step hides events at or after the resume point left by an
            # earlier attempt, so a resumed run shows no duplicated steps.
            if purge_step is not None:
                _after_newest_event_file(run_dir)
            self.writer = EventFile(run_dir, purge_step)
            self.writer.add_summary(custom_scalars(CUSTOM_SCALARS))

    def _truncate_metrics(self, keep_epochs: int) -> None:
        """Drop epochs after the resume point: they will be trained again."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["epoch"] <= keep_epochs]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, path)

    def print(self, text: str = "") -> None:
        if self.enabled:
            print(text, flush=True)

    def header(self, lines: list[tuple[str, object]]) -> None:
        width = max(len(k) for k, _ in lines)
        for key, value in lines:
            self.print(f"{key:<{width}}  {value}")
        self.print()

    def table_row(self, values: dict) -> None:
        if not self.enabled:
            return
        if self._rows_printed % 25 == 0:
            self.print(" ".join(f"{name:>{w}}" for name, w, _ in COLUMNS))
        cells = []
        for name, width, spec in COLUMNS:
            v = values.get(name)
            cells.append(" " * width if v is None else spec.format(v))
        self.print(" ".join(cells))
        self._rows_printed += 1

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        """Several scalars as one TensorBoard event, handed to the writer in batches.

        One event per call instead of one per scalar, and one hand-off every TB_HANDOFF_SECONDS, which builds the
        protobuf messages and writes them (spine/event_file.py): one by one on the steps that log, they cost
        several times more. Scalars of the step just queued, within MERGE_SECONDS, join its event (an epoch's row
        on its last step, when that step logged): every event is a record, with its own checksum computed in Python.
        """
        scalars, wall = [(tag, float(v)) for tag, v in values.items()], time.time()
        if self._pending and self._pending[-1][0] == step and wall - self._pending[-1][2] < MERGE_SECONDS:
            self._pending[-1][1].extend(scalars)
        else:
            self._pending.append((step, scalars, wall))
        if time.perf_counter() - self._last_handoff >= TB_HANDOFF_SECONDS:
            self._handoff()

    def _handoff(self) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        for step, values, walltime in self._pending:
            summary = Summary(value=[Summary.Value(tag=tag, simple_value=v) for tag, v in values])
            self.writer.add_summary(summary, step, walltime)
        self._pending.clear()
        self.writer.flush()
        self._last_handoff = time.perf_counter()

    def step(self, meter: EpochMeter, step: int, lr: float, epoch: int, elapsed: float, console: bool) -> None:
        """The latest step's scalars for TensorBoard, every --log-every steps; in long epochs (`console`) a console
        line too, at most about one a second."""
        if not self.enabled:
            return
        losses, norms = meter.series(len(meter) - 1)
        if self.writer:
            self._scalars(step, {"step/train_loss": losses[0], "step/lr": lr, "step/grad_norm": norms[0]})
        clock = time.perf_counter()
        if console and (self._last_printed is None or clock - self._last_printed >= PRINT_SECONDS):
            self._last_printed = clock
            self.table_row({"epoch": epoch + 1, "step": step, "train_loss": losses[0], "lr": lr,
                            "grad_norm": norms[0], "elapsed": fmt_seconds(elapsed)})

    def epoch(self, record: dict, elapsed: float) -> None:
        """One completed epoch: a metrics.jsonl line, TensorBoard scalars, and every --print-every a console line."""
        if not self.enabled:
            return
        epoch, clock = record["epoch"], time.perf_counter()
        by_clock = self._last_printed is None or clock - self._last_printed >= PRINT_SECONDS
        if (epoch % self.print_every == 0 if self.print_every else by_clock) or epoch == self.epochs:
            self._last_printed = clock
            per_epoch = (time.perf_counter() - self._started) / max(1, epoch - self._first_epoch)
            self.table_row(dict(record, **{"samples/s": record["samples_per_sec"]}, elapsed=fmt_seconds(elapsed),
                                eta=fmt_seconds(per_epoch * (self.epochs - epoch))))
        # Wall time since the previous epoch's row: its steps, validation, all-reduce, logging and any checkpoint.
        record = dict(record, epoch_wall_seconds=clock - self._last_epoch_logged, peak_rss_mb=_peak_rss_mb())
        self._last_epoch_logged = clock
        self.metrics_file.write(json.dumps(record, allow_nan=True) + "\n")
        if clock - self._last_flush >= FLUSH_SECONDS:  # a crash loses only epochs that a resume trains again
            self.metrics_file.flush()
            self._last_flush = clock
        if self.writer:
            # Groups named so TensorBoard's Time Series (groups by name, the first two open) opens on them.
            values = {"loss/train": record["train_loss"], "loss/val": record["val_loss"],
                      "accuracy/train": record["train_acc"], "accuracy/val": record["val_acc"]}
            values.update({"perf/samples_per_sec": record["samples_per_sec"], "progress/epoch": record["epoch"],
                           "perf/epoch_seconds": record["epoch_seconds"], "perf/peak_rss_mb": record["peak_rss_mb"]})
            self._scalars(record["step"], values)

    def partial_epoch(self, meter: EpochMeter, state) -> None:
        """The steps of an epoch that did not finish (a diverged run): to metrics.jsonl only."""
        if self.enabled and len(meter):
            step_losses, step_grad_norms = meter.series(0)
            record = {"epoch": state.epoch + 1, "step": state.global_step, "partial": True, "train_loss": None,
                      "step_losses": step_losses, "step_grad_norms": step_grad_norms}
            self.metrics_file.write(json.dumps(record, allow_nan=True) + "\n")
            self.metrics_file.flush()

    def hparams(self, config: dict, final: dict) -> None:
        """This run's record in TensorBoard's HParams dashboard: `config` (flag name -> value, plus world_size)
        narrowed to the hyperparameters a user varies; a run whose `final["diverged"]` is set ends as a failed
        session. Its metrics are the run's own train/val series, so nothing is written as a scalar here."""
        if not self.writer:
            return
        self._handoff()
        # Written into this run's own event file (add_hparams would open a sub-run, where the plugin would look
        # for the metric series and find none).
        for summary in hparams_summaries(config, failed=bool(final.get("diverged"))):
            self.writer.add_summary(summary)

    def summary(self, summary: dict) -> None:
        self._write("summary.json", json.dumps(summary, indent=2) + "\n")

    def config(self, toml_text: str) -> None:
        """config.toml: `train.py --config <it> --run-name B` replays this run."""
        self._write("config.toml", toml_text)

    def _write(self, name: str, text: str) -> None:
        if self.enabled:
            path = self.run_dir / name
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)

    def flush(self) -> None:
        if self.enabled:
            self.metrics_file.flush()
            if self.writer:
                self._handoff()  # which flushes the event file

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics_file.close()
        if self.writer:
            self._handoff()
            self.writer.close()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """An instrument's scalars at `step` (rank 0; TensorBoard groups tags by the part before the first '/')."""
        if self.writer and values:
            self._scalars(step, values)

    def histograms(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        if self.writer:
            from torch.utils.tensorboard.summary import histogram

            self._handoff()  # keep the event file in step order
            for tag, values in tensors.items():
                self.writer.add_summary(histogram(tag, values.detach().float().cpu(), HISTOGRAM_EDGES), step)
            self.writer.flush()


def _histogram_edges() -> list[float]:
    """SummaryWriter's default bucket edges ('tensorflow'): 0 and +-1e-12, each next one 10% further, to 1e20."""
    positive = [1e-12]
    while positive[-1] * 1.1 < 1e20:
        positive.append(positive[-1] * 1.1)
    return [-v for v in reversed(positive)] + [0] + positive


HISTOGRAM_EDGES = _histogram_edges()


# The HParams dashboard's metric columns: (tag, column title, dataset). The plugin shows, for each run, the last
# value of the run's own series of that tag: the final epoch's, never a copy written for the dashboard.
HPARAM_METRICS = (
    ("loss/val", "val loss", "DATASET_VALIDATION"),
    ("accuracy/val", "val acc", "DATASET_VALIDATION"),
    ("loss/train", "train loss", "DATASET_TRAINING"),
    ("accuracy/train", "train acc", "DATASET_TRAINING"),
    ("perf/samples_per_sec", "samples/s (last epoch)", "DATASET_TRAINING"),
)
# The HParams table shows five hyperparameter columns until the user ticks more: those marked `differs`, then the
# rest, each by name. A run cannot know what its siblings vary, so it marks these, the knobs most studies turn
# (the others stay listed, one tick away).
HPARAM_HEADLINE = ("lr", "optimizer", "hidden", "global_batch", "world_size")


def hparam_values(config: dict) -> dict[str, float | str | bool]:
    """The HParams columns of a run: the flags declared `hparam=True` (spine.config.HPARAMS), the world size and
    the global batch it implies. Paths, run names, resume, checkpoint and logging settings stay out: they differ
    between runs without changing what a run learns."""
    from spine.config import HPARAMS

    values: dict[str, float | str | bool] = {}
    for key in HPARAMS:
        v = config[key]
        values[key] = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
    values["world_size"] = config["world_size"]
    # Samples per optimizer step: --batch-size is per rank and per micro-batch.
    values["global_batch"] = config["batch-size"] * config["grad-accum-steps"] * config["world_size"]
    return values


def hparams_summaries(config: dict, failed: bool) -> list:
    """The hparams plugin's three records for this run, as Summary protos: the experiment (which columns: every
    run declares the same ones, since TensorBoard takes them from whichever run it reads first), the session's
    start (this run's values) and its end (success, or failure for a diverged run)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    from spine.config import BY_NAME

    values = hparam_values(config)
    infos, start = [], plugin_data_pb2.SessionStartInfo()
    for key, v in values.items():
        field = BY_NAME.get(key)
        if isinstance(v, bool):  # before the number case: a bool is an int
            kind, start.hparams[key].bool_value = api_pb2.DATA_TYPE_BOOL, v
        elif isinstance(v, (int, float)):
            kind, start.hparams[key].number_value = api_pb2.DATA_TYPE_FLOAT64, v
        else:
            kind, start.hparams[key].string_value = api_pb2.DATA_TYPE_STRING, str(v)
        infos.append(api_pb2.HParamInfo(name=key, type=kind, differs=key in HPARAM_HEADLINE,
                                        description=field.metadata["help"] if field else key.replace("_", " ")))
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=title,
                                  dataset_type=api_pb2.DatasetType.Value(dataset))
               for tag, title, dataset in HPARAM_METRICS]
    status = api_pb2.STATUS_FAILURE if failed else api_pb2.STATUS_SUCCESS
    records = [
        ("_hparams_/experiment", plugin_data_pb2.HParamsPluginData(
            experiment=api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics))),
        ("_hparams_/session_start_info", plugin_data_pb2.HParamsPluginData(session_start_info=start)),
        ("_hparams_/session_end_info", plugin_data_pb2.HParamsPluginData(
            session_end_info=plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time()))),
    ]
    return [Summary(value=[Summary.Value(tag=tag, metadata=hparams_metadata(data))]) for tag, data in records]


def hparams_metadata(data: plugin_data_pb2.HParamsPluginData) -> SummaryMetadata:
    """The HParams plugin's metadata for one record: what tensorboard.plugins.hparams.metadata.create_summary_metadata
    builds, without importing that module, which loads tensorboard's TensorFlow stub (tens of ms at the end of every
    run). Its plugin data version is 0, the field's default, so `data` already carries it."""
    from tensorboard.compat.proto.summary_pb2 import SummaryMetadata

    return SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="hparams",
                                                                  content=data.SerializeToString()))


def _after_newest_event_file(run_dir: Path) -> None:
    """Wait, if need be, for the clock to pass the second the run's newest event file was created in.

    TensorBoard reads a run's event files in name order, and a name is the creation second, then host, pid and a
    per-process counter. The purge a resumed writer records applies only to files read before it, so its file
    must sort after them: in the same second and process a counter going from 9 to 10 sorts first (seen in CI)."""
    seconds = [int(p.name.split(".")[3]) for p in run_dir.glob("events.out.tfevents.*")
               if len(p.name.split(".")) > 3 and p.name.split(".")[3].isdigit()]
    while seconds and time.time() < max(seconds) + 1:
        time.sleep(0.02)


def now() -> float:
    return time.perf_counter()


def _peak_rss_mb() -> float:
    """The process's peak resident memory so far: one system call (reading /proc costs more, on every epoch)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """summary.json and the rows of metrics.jsonl: one per completed epoch, then at most one row marked
    "partial" holding the steps of an epoch that a divergence stopped (no epoch metrics in it)."""
    summary_file, metrics_file = run_dir / "summary.json", run_dir / "metrics.jsonl"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    metrics = [json.loads(ln) for ln in metrics_file.read_text().splitlines() if ln] if metrics_file.exists() else []
    return summary, metrics


def completed_epochs(metrics: list[dict]) -> list[dict]:
    return [m for m in metrics if not m.get("partial")]
