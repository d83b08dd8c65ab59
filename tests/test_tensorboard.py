"""What TensorBoard reads from a run's event files: curves only (no single-point series, no hparam/* copies), and
an HParams record that lists the hyperparameters a user varies and points at the run's own train/val series.

The browser itself is left to `make tensorboard-shots`: TensorBoard and headless Chromium took about 30 s for the
three views of two existing runs on this shared 2-core machine (`time python -m launch.tensorboard_shots --logdir
DIR`), over the budget of a test; here only the script's refusal of bad input is checked."""

from __future__ import annotations

import math

import pytest

from spine.config import HPARAMS, Config
from tests.helpers import ROOT, run_train

EPOCHS = 4
# 160 training samples in batches of 32: 5 steps an epoch, 20 in all; per-step scalars at steps 5, 10, 15, 20.
ARGS = ["--epochs", str(EPOCHS), "--log-every", "5", "--lr", "0.003", "--seed", "3"]
# Settings that say where or how often a run writes, or how it is executed: none of them changes what it learns.
NOT_HPARAMS = {"run-name", "runs-dir", "checkpoints-dir", "resume", "overwrite", "checkpoint-every-steps",
               "checkpoint-every-epochs", "checkpoint-every-seconds", "keep-checkpoints", "log-every", "print-every",
               "tensorboard", "threads", "device", "pg-timeout", "eval-batch-size", "target-loss"}


def _read(run_dir):
    """(scalar series by tag, hparams plugin records by tag) of a run, through TensorBoard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    series = {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    records = {
        "experiment": metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG]),
        "start": metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG]),
        "end": metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG]),
    }
    return series, records


def _value(v):
    kind = v.WhichOneof("kind")
    return getattr(v, kind)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    run = run_train(tmp_path_factory.mktemp("tb"), ARGS, name="short")
    assert run.returncode == 0, run.output[-2000:]
    return run, *_read(run.run_dir)


@pytest.mark.timeout(60)
def test_every_scalar_is_a_curve_and_none_is_an_hparam_copy(short_run):
    run, series, _ = short_run
    assert not [tag for tag in series if tag.startswith("hparam")]
    points = {tag: len(events) for tag, events in series.items()}
    assert min(points.values()) > 1, points
    for tag in ("loss/train", "accuracy/train", "loss/val", "accuracy/val", "perf/samples_per_sec"):
        assert [e.step for e in series[tag]] == [5 * (e + 1) for e in range(EPOCHS)], tag
    assert [e.step for e in series["step/train_loss"]] == [5, 10, 15, 20]


@pytest.mark.timeout(60)
def test_hparams_list_the_varied_hyperparameters_and_world_size(short_run):
    run, _, records = short_run
    hparams = {k: _value(v) for k, v in records["start"].hparams.items()}
    assert set(hparams) == set(HPARAMS) | {"world_size", "global_batch"}
    assert not set(hparams) & NOT_HPARAMS
    assert {"lr", "batch-size", "optimizer", "model", "hidden", "dropout", "seed", "schedule"} <= set(hparams)
    assert hparams["lr"] == 0.003 and hparams["seed"] == 3 and hparams["optimizer"] == "adam"
    assert hparams["hidden"] == "64,64" and hparams["batchnorm"] is False
    assert hparams["world_size"] == 1 and hparams["global_batch"] == 32
    # The experiment declares the same columns, with the flag's help as the description.
    infos = {h.name: h for h in records["experiment"].hparam_infos}
    assert set(infos) == set(hparams)
    assert infos["lr"].description == Config.__dataclass_fields__["lr"].metadata["help"]


@pytest.mark.timeout(60)
def test_hparams_metrics_are_the_last_points_of_the_runs_own_series(short_run):
    from tensorboard.plugins.hparams import api_pb2

    run, series, records = short_run
    metrics = [(m.name.group, m.name.tag) for m in records["experiment"].metric_infos]
    assert metrics[:4] == [("", "loss/val"), ("", "accuracy/val"), ("", "loss/train"), ("", "accuracy/train")]
    # Group "" is the session's own run: the plugin shows the last point of that run's series of each tag.
    for _, tag in metrics:
        assert len(series[tag]) == EPOCHS, tag
    final = run.summary["final"]
    assert math.isclose(series["loss/val"][-1].value, final["val_loss"], rel_tol=1e-6)
    assert math.isclose(series["loss/train"][-1].value, final["train_loss"], rel_tol=1e-6)
    assert series["accuracy/val"][-1].value == pytest.approx(final["val_acc"])
    assert records["end"].status == api_pb2.STATUS_SUCCESS


@pytest.mark.timeout(60)
def test_a_diverged_run_ends_as_a_failed_session_with_the_same_columns(tmp_path):
    from tensorboard.plugins.hparams import api_pb2

    run = run_train(tmp_path, ["--epochs", "3", "--lr", "1e6", "--optimizer", "sgd", "--log-every", "1"], name="div")
    assert run.returncode == 3, run.output[-2000:]
    series, records = _read(run.run_dir)
    assert records["end"].status == api_pb2.STATUS_FAILURE
    assert not [tag for tag in series if tag.startswith("hparam")]
    healthy = run_train(tmp_path, ["--epochs", "2"], name="ok")
    _, healthy_records = _read(healthy.run_dir)
    # TensorBoard takes the dashboard's columns from whichever run it reads first: every run declares the same.
    assert records["experiment"] == healthy_records["experiment"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("logdir", ["missing", "empty"])
def test_the_screenshot_script_refuses_a_logdir_without_runs(tmp_path, capsys, logdir):
    from launch.tensorboard_shots import main

    (tmp_path / "empty").mkdir()
    assert main(["--logdir", str(tmp_path / logdir), "--out", str(tmp_path / "shots"), "--no-install"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --logdir") and "\n" not in err
    assert not (tmp_path / "shots").exists()


@pytest.mark.timeout(60)
def test_an_epoch_row_on_a_logged_step_shares_that_steps_event(short_run):
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    run, series, _ = short_run
    [events_file] = run.run_dir.glob("events.out.tfevents.*")
    scalar_events = [e for e in LegacyEventFileLoader(str(events_file)).Load()
                     if e.HasField("summary") and any(v.HasField("simple_value") for v in e.summary.value)]
    # Every logged step here is its epoch's last: one event per step carries both, and readers see every value.
    assert sorted(e.step for e in scalar_events) == [5, 10, 15, 20]
    for event in scalar_events:
        tags = {v.tag for v in event.summary.value}
        assert {"step/train_loss", "step/grad_norm", "loss/train", "loss/val"} <= tags, (event.step, tags)
    assert [e.step for e in series["loss/val"]] == [e.step for e in series["step/train_loss"]] == [5, 10, 15, 20]


def _events(path):
    """The events of one event file, as written (no migration of old formats)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    return list(LegacyEventFileLoader(str(path)).Load())


def test_the_event_file_matches_summarywriters_without_its_thread(tmp_path):
    import threading

    import torch
    from torch.utils.tensorboard import SummaryWriter

    from spine.event_file import EventFile
    from spine.logger import CUSTOM_SCALARS, RunLogger

    threads = threading.active_count()
    logger = RunLogger(tmp_path / "ours", enabled=True, tensorboard=True, purge_step=7, keep_epochs=0)
    logger.scalars(8, {"a/b": 1.5})
    logger.histograms(8, {"w": torch.linspace(-3, 5, 50)})
    assert threading.active_count() == threads  # SummaryWriter would have started its writer thread
    logger.close()
    logger.close()  # a second close is harmless, as SummaryWriter's is
    reference = SummaryWriter(str(tmp_path / "reference"), purge_step=7)
    reference.add_custom_scalars({category: {chart: ["Multiline", tags] for chart, tags in charts.items()}
                                  for category, charts in CUSTOM_SCALARS.items()})  # SummaryWriter's layout format
    reference.add_scalar("a/b", 1.5, 8)
    reference.add_histogram("w", torch.linspace(-3, 5, 50), 8)
    reference.close()
    [ours], [theirs] = ((tmp_path / d).glob("events.out.tfevents.*") for d in ("ours", "reference"))
    assert ours.name.split(".")[:3] == theirs.name.split(".")[:3] and ours.name.split(".")[4:-1] == \
        theirs.name.split(".")[4:-1]  # events.out.tfevents.<second>.<host>.<pid>.<counter>
    ours_events, their_events = _events(ours), _events(theirs)
    for event in ours_events + their_events:
        event.ClearField("wall_time")
        event.ClearField("source_metadata")
        for value in event.summary.value:  # add_scalar tags its value with the scalars plugin; the reader does not
            if value.HasField("simple_value"):
                value.ClearField("metadata")
    assert ours_events == their_events  # header, purge events, layout, the scalar and the histogram's buckets

    closed = EventFile(tmp_path / "ours")
    closed.close()
    closed.close()
    closed.flush()  # after close: nothing to do, no error


def test_an_epoch_row_joins_the_step_event_only_when_it_is_recent(tmp_path):
    from spine.logger import MERGE_SECONDS, RunLogger

    logger = RunLogger(tmp_path, enabled=True, tensorboard=True, purge_step=None, keep_epochs=0)
    logger.scalars(5, {"step/train_loss": 1.0})
    logger.scalars(5, {"loss/val": 2.0})
    assert len(logger._pending) == 1
    logger._pending[-1] = (5, logger._pending[-1][1], logger._pending[-1][2] - MERGE_SECONDS)  # as after a long pass
    logger.scalars(5, {"loss/train": 3.0})
    assert [len(values) for _, values, _ in logger._pending] == [2, 1]
    logger.close()
    assert sorted(v.tag for e in _events(next(tmp_path.glob("events.*"))) for v in e.summary.value
                  if v.HasField("simple_value")) == ["loss/train", "loss/val", "step/train_loss"]


def test_the_event_files_checksums_and_layout_are_tensorboards_own_and_need_none_of_its_writer():
    import random
    import subprocess
    import sys

    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference_crc
    from torch.utils.tensorboard.summary import custom_scalars as reference_layout

    from spine.event_file import custom_scalars, masked_crc32c
    from spine.logger import CUSTOM_SCALARS

    rng = random.Random(0)
    for size in (0, 1, 7, 8, 82, 1000):
        data = bytes(rng.randrange(256) for _ in range(size))
        assert masked_crc32c(data) == reference_crc(data), size
    torch_layout = {category: {title: ["Multiline", tags] for title, tags in charts.items()}
                    for category, charts in CUSTOM_SCALARS.items()}
    assert custom_scalars(CUSTOM_SCALARS).SerializeToString() == reference_layout(torch_layout).SerializeToString()
    # The point of writing the framing here: tensorboard.summary (with its TensorFlow stub) is not imported.
    check = "import sys, spine.event_file; sys.exit('tensorboard.summary' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], cwd=ROOT, timeout=60).returncode == 0


def test_the_hparams_records_are_tensorboards_own_and_their_tags_too():
    from tensorboard.plugins.hparams import metadata

    from spine.logger import hparams_summaries

    summaries = hparams_summaries(dict(Config().to_dict(), world_size=1), failed=False)
    assert [s.value[0].tag for s in summaries] == [metadata.EXPERIMENT_TAG, metadata.SESSION_START_INFO_TAG,
                                                   metadata.SESSION_END_INFO_TAG]
    for summary in summaries:
        ours = summary.value[0].metadata.plugin_data
        data = metadata.plugin_data_pb2.HParamsPluginData.FromString(ours.content)
        reference = metadata.create_summary_metadata(data).plugin_data
        parse = metadata.plugin_data_pb2.HParamsPluginData.FromString  # a map's bytes are in no fixed order
        assert ours.plugin_name == reference.plugin_name and parse(ours.content) == parse(reference.content)
