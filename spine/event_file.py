"""TensorBoard's event file, written on the loop's own thread.

torch's SummaryWriter hands each event to a background thread through a queue of ten: the loop blocks whenever
the queue is full, and the thread computes each record's CRC-32C byte by byte in Python while holding the GIL.
RunLogger already hands its events over in batches, so a batch can simply be written here: the same records
(tensorboard's RecordWriter), the same file name and header events as SummaryWriter's, and no thread. make bench's
logging clock measures what that saves.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from pathlib import Path

from tensorboard.compat.proto.event_pb2 import Event, SessionLog, SourceMetadata
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.record_writer import RecordWriter

_FILES_OPENED = itertools.count()  # the name's last field: unique within the process, as SummaryWriter's is


class EventFile:
    """One run's event file: summaries appended as records, on disk at `flush()`.

    `purge_step`: a resumed run's first step. TensorBoard then drops the events at or after it from the run's
    files it read before this one (the steps the resume trains again); SummaryWriter(purge_step=...) writes the
    same two events."""

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_FILES_OPENED)}"
        self.path = Path(log_dir) / name
        self._records = RecordWriter(open(self.path, "wb"))
        self.add_event(Event(file_version="brain.Event:2", source_metadata=SourceMetadata(writer="spine")))
        if purge_step is not None:
            self.add_event(Event(step=purge_step, file_version="brain.Event:2"))
            self.add_event(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        self.flush()

    def add_event(self, event: Event, step: int | None = None, walltime: float | None = None) -> None:
        event.wall_time = time.time() if walltime is None else walltime
        if step is not None:
            event.step = int(step)
        self._records.write(event.SerializeToString())

    def add_summary(self, summary: Summary, step: int | None = None, walltime: float | None = None) -> None:
        self.add_event(Event(summary=summary), step, walltime)

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        if not self._records.closed:
            self._records.close()
