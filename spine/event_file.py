"""TensorBoard's event file, written on the loop's own thread.

torch's SummaryWriter hands each event to a background thread through a queue of ten: the loop blocks whenever
the queue is full, and the thread computes each record's CRC-32C byte by byte in Python while holding the GIL.
RunLogger already hands its events over in batches, so a batch can simply be written here, with no thread: the
same records (TFRecord framing: length, checksums, the serialised Event), the same file name, and the same header
and purge events as SummaryWriter's (only the header's writer name differs: "spine"). The framing is written here
rather than through tensorboard's RecordWriter, whose import pulls in tensorboard's TensorFlow stub (tens of ms at
every start). make bench's logging clock and its side-by-side rows measure what this saves.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from pathlib import Path

from tensorboard.compat.proto.event_pb2 import Event, SessionLog, SourceMetadata
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.plugins.custom_scalar.layout_pb2 import Category, Chart, Layout, MultilineChartContent

_FILES_OPENED = itertools.count()  # the name's last field: unique within the process, as SummaryWriter's is


def _crc32c_table() -> tuple[int, ...]:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78): the checksum of each byte value."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum of `data`: its CRC-32C, rotated right by 15 bits, plus a constant."""
    crc, table = 0xFFFFFFFF, _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def custom_scalars(layout: dict[str, dict[str, list[str]]]) -> Summary:
    """The Custom Scalars dashboard's layout, {category: {chart title: [tags on one multiline chart]}}: the
    summary torch's SummaryWriter.add_custom_scalars writes for "Multiline" charts."""
    categories = [Category(title=category, chart=[Chart(title=title, multiline=MultilineChartContent(tag=tags))
                                                  for title, tags in charts.items()])
                  for category, charts in layout.items()]
    tensor = TensorProto(dtype="DT_STRING", string_val=[Layout(category=categories).SerializeToString()],
                         tensor_shape=TensorShapeProto())
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="custom_scalars"))
    return Summary(value=[Summary.Value(tag="custom_scalars__config__", tensor=tensor, metadata=metadata)])


class EventFile:
    """One run's event file: summaries appended as records, on disk at `flush()`.

    `purge_step`: a resumed run's first step. TensorBoard then drops the events at or after it from the run's
    files it read before this one (the steps the resume trains again); SummaryWriter(purge_step=...) writes the
    same two events."""

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_FILES_OPENED)}"
        self.path = Path(log_dir) / name
        self._file = open(self.path, "xb")  # "x": a name another writer took in the same second is an error, not lost
        self.add_event(Event(file_version="brain.Event:2", source_metadata=SourceMetadata(writer="spine")))
        if purge_step is not None:
            self.add_event(Event(step=purge_step, file_version="brain.Event:2"))
            self.add_event(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        self.flush()

    def add_event(self, event: Event, step: int | None = None, walltime: float | None = None) -> None:
        event.wall_time = time.time() if walltime is None else walltime
        if step is not None:
            event.step = int(step)
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", masked_crc32c(header)) + data +
                         struct.pack("<I", masked_crc32c(data)))

    def add_summary(self, summary: Summary, step: int | None = None, walltime: float | None = None) -> None:
        self.add_event(Event(summary=summary), step, walltime)

    def flush(self) -> None:
        """The records written so far reach the file (a no-op once closed, as after SummaryWriter.close)."""
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        self._file.close()  # idempotent
