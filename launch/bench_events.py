"""TensorBoard's event writing, side by side: torch's SummaryWriter (a writer thread behind a queue of ten) against
spine/event_file.py's EventFile (written on the calling thread), on the same batch of events.

    python -m launch.bench_events [--repeats 9] [--events 100]

Each repeat writes one batch of `--events` events of 8 scalars (an epoch row's) with each writer, in rotating
order, then flushes: the batch RunLogger hands over every 10 s and before each checkpoint. Timed per writer: the
calling thread's wall time from the first event to the end of the flush, and the CPU of every thread of the process
over the same span (the writer thread's included). make bench runs it and tabulates the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tensorboard.compat.proto.summary_pb2 import Summary

from spine.event_file import EventFile

TAGS = ("loss/train", "loss/val", "accuracy/train", "accuracy/val", "perf/samples_per_sec", "progress/epoch",
        "perf/epoch_seconds", "perf/peak_rss_mb")


def write_batch(add_summary: Callable[[Summary, int, float], None], flush: Callable[[], None],
                events: int) -> tuple[float, float]:
    """(wall seconds of the calling thread, CPU seconds of all threads) to write and flush one batch."""
    wall, cpu = time.perf_counter(), time.process_time()
    for step in range(events):
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=step + i / 8) for i, tag in enumerate(TAGS)])
        add_summary(summary, step, time.time())
    flush()
    return time.perf_counter() - wall, time.process_time() - cpu


def compare(repeats: int, events: int) -> list[dict]:
    from torch.utils.tensorboard import SummaryWriter

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-events-") as tmp:
        for repeat in range(repeats):
            kinds = ["SummaryWriter", "EventFile"]
            for kind in kinds[repeat % 2:] + kinds[:repeat % 2]:
                folder = Path(tmp) / f"{kind}-{repeat}"
                if kind == "SummaryWriter":
                    writer = SummaryWriter(str(folder))
                    time.sleep(0.05)  # its thread started and idle, as during training
                    wall, cpu = write_batch(writer.file_writer.add_summary, writer.flush, events)
                    writer.close()
                else:
                    folder.mkdir()
                    event_file = EventFile(folder)
                    time.sleep(0.05)
                    wall, cpu = write_batch(event_file.add_summary, event_file.flush, events)
                    event_file.close()
                rows.append({"case": "tensorboard events", "kind": kind, "repeat": repeat, "events": events,
                             "seconds": wall, "cpu_seconds": cpu})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--events", type=int, default=100)
    opts = p.parse_args()
    for row in compare(opts.repeats, opts.events):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
