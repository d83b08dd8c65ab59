"""Scaling: gradient accumulation, two torchrun "nodes", and the make scale sweep on a tiny configuration."""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, TORCHRUN, free_port, run_train, spawn_ranks, world2_run

# 190 samples -> 152 training samples: at a step batch of 32 the fifth step is short (24 samples), so the
# micro-batch weighting is tested on an uneven split too (8+8+8 at world 1, 8+4 per rank at world 2).
COMMON = ["--dataset", "moons", "--n-samples", "190", "--epochs", "4", "--no-tensorboard", "--seed", "5",
          "--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9", "--threads", "1"]
TIGHT = {"rtol": 1.3e-6, "atol": 1e-6}


def assert_close_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **TIGHT, msg=name)


@pytest.fixture(scope="module")
def one_big_batch(tmp_path_factory):
    """The reference: one process, one batch of 32 per step."""
    tmp = tmp_path_factory.mktemp("reference")
    # Every epoch's checkpoint is kept: the resume test below starts from epoch 2's.
    r = run_train(tmp, COMMON + ["--batch-size", "32", "--checkpoint-every-epochs", "1"], name="reference")
    assert r.returncode == 0, r.stderr
    return r


@pytest.mark.timeout(120)
def test_four_micro_batches_of_8_equal_one_batch_of_32_at_world_1(tmp_path, one_big_batch):
    acc = run_train(tmp_path, COMMON + ["--batch-size", "8", "--grad-accum-steps", "4"], name="accumulated")
    assert acc.returncode == 0, acc.stderr
    assert "8 per rank x 4 accumulated, 32 global, 5 steps per epoch" in acc.stdout
    assert acc.summary["global_step"] == one_big_batch.summary["global_step"] == 20
    assert_close_weights(acc.weights(), one_big_batch.weights())
    # Logged losses are per-sample means of the whole step, as with the real batch.
    torch.testing.assert_close(torch.tensor(acc.step_losses()), torch.tensor(one_big_batch.step_losses()), **TIGHT)
    assert [m["train_acc"] for m in acc.metrics] == [m["train_acc"] for m in one_big_batch.metrics]

    # Control: the comparison can fail. Batches of 8 without accumulation take 4x the steps and end elsewhere.
    small = run_train(tmp_path, COMMON + ["--batch-size", "8"], name="small")
    assert small.returncode == 0, small.stderr
    assert any(not torch.allclose(small.weights()[k], v, **TIGHT) for k, v in one_big_batch.weights().items())


world2_run("scale-accumulating", COMMON + ["--global-batch-size", "32", "--grad-accum-steps", "2"])
TWO_NODES = ["--dataset", "moons", "--n-samples", "200", "--epochs", "3", "--global-batch-size", "32",
             "--no-tensorboard", "--threads", "1", "--seed", "2"]
world2_run("scale-one-node", TWO_NODES)


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_two_ranks_accumulating_equal_one_batch_of_32(world2, one_big_batch):
    ddp = world2["scale-accumulating"]
    assert ddp.returncode == 0, ddp.stderr
    assert "8 per rank x 2 accumulated, 32 global" in ddp.stdout
    assert ddp.summary["global_step"] == 20
    assert_close_weights(ddp.weights(), one_big_batch.weights())
    checksums = ddp.summary["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    torch.testing.assert_close(ddp.summary["final"]["train_loss"], one_big_batch.summary["final"]["train_loss"],
                               **TIGHT)


@pytest.mark.timeout(120)
def test_a_resume_may_change_how_the_global_batch_is_reached_but_not_its_size(tmp_path, one_big_batch):
    epoch_2 = one_big_batch.ckpt_dir / "step-00000010.pt"
    same = run_train(tmp_path, COMMON + ["--batch-size", "8", "--grad-accum-steps", "4", "--resume", str(epoch_2)],
                     name="resumed-accumulating")
    assert same.returncode == 0, same.stderr
    assert_close_weights(same.weights(), one_big_batch.weights())
    smaller = run_train(tmp_path, COMMON + ["--batch-size", "8", "--grad-accum-steps", "2", "--resume", str(epoch_2)],
                        name="resumed-smaller")
    assert smaller.returncode == 2
    assert "global batch of 32, this run 16" in smaller.stderr


def _one_step_on_ranks(rank: int, world: int, k: int, b: int) -> tuple[bool, list[int]]:
    """train.py's own forward_backward over k micro-batches of b per rank, against one process holding the whole
    global batch: (does .grad match the reference's, and at which backward pass did the all-reduce fire?)."""
    from types import SimpleNamespace

    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    from spine.distributed import distributed_session
    from train import forward_backward

    with distributed_session("cpu", 1, 30):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        reference = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(1)
        data = SimpleNamespace(train_x=torch.randn(world * k * b, 5, generator=gen),
                               train_y=torch.randint(0, 3, (world * k * b,), generator=gen))
        # The reference sees the whole global batch in one process: the gradient of its mean loss.
        torch.nn.functional.cross_entropy(reference(data.train_x), data.train_y).backward()
        backward_passes, fired_at = [0], []
        model[0].weight.register_hook(lambda grad: backward_passes.__setitem__(0, backward_passes[0] + 1))

        def counting_allreduce(process_group, bucket):  # the default all-reduce, noting when it runs
            fired_at.append(backward_passes[0])
            return allreduce_hook(process_group, bucket)

        ddp = DDP(model)
        ddp.register_comm_hook(None, counting_allreduce)
        # This rank's rows, laid out as DistributedSampler lays them out (rank, rank + world, ...).
        forward_backward(ddp, torch.nn.CrossEntropyLoss(), data, torch.arange(rank, world * k * b, world), b)
        matches = all(torch.allclose(p.grad, r.grad, rtol=1e-5, atol=1e-7)
                      for p, r in zip(model.parameters(), reference.parameters(), strict=True))
        return matches, fired_at


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_micro_batches_all_reduce_once_on_the_last_and_give_the_global_batch_gradient():
    """As PyTorch's own no_sync test, on train.py's real step: the first k-1 backward passes stay local (no_sync),
    the all-reduce fires during the k-th, and the result is the gradient of the global batch's mean loss."""
    per_rank = spawn_ranks(_one_step_on_ranks, 2, 3, 4)
    assert per_rank == [(True, [3]), (True, [3])]
    # One micro-batch (forward_backward's plain path): the all-reduce fires in its one backward.
    assert spawn_ranks(_one_step_on_ranks, 2, 1, 4) == [(True, [1]), (True, [1])]


def test_the_plain_step_computes_the_general_paths_floats():
    """forward_backward's plain path (one batch, fp32, nothing measuring) skips the general path's contexts and
    bookkeeping, not its arithmetic: the same loss, logits, labels and .grad, bit for bit."""
    from types import SimpleNamespace

    from spine.distributed import NO_CONTEXT
    from train import forward_backward

    gen = torch.Generator().manual_seed(3)
    data = SimpleNamespace(train_x=torch.randn(64, 5, generator=gen), train_y=torch.randint(0, 3, (64,), generator=gen))
    torch.manual_seed(0)
    plain_model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    general_model = copy.deepcopy(plain_model)
    idx = torch.randperm(64, generator=gen)[:24]
    measured = []

    def measure(micro: int, step: int):  # any measure sends the step down the general path
        measured.append((micro, step))
        return NO_CONTEXT

    def no_general_path(*_):  # the plain path enters no context: DDP's no_sync choice is the general path's
        raise AssertionError("the plain step took the general path")

    import train

    original, train.grad_sync = train.grad_sync, no_general_path
    try:
        plain = forward_backward(plain_model, torch.nn.CrossEntropyLoss(), data, idx, 24)
    finally:
        train.grad_sync = original
    general = forward_backward(general_model, torch.nn.CrossEntropyLoss(), data, idx, 24, measure=measure)
    assert measured == [(24, 24)]
    assert all(torch.equal(a, b) for a, b in zip(plain, general, strict=True))
    assert all(torch.equal(p.grad, g.grad)
               for p, g in zip(plain_model.parameters(), general_model.parameters(), strict=True))


def test_grad_sync_is_a_no_op_without_ddp():
    from spine.distributed import grad_sync

    model = torch.nn.Linear(2, 2)
    for sync in (True, False):
        with grad_sync(model, sync):
            model(torch.ones(1, 2)).sum().backward()
    torch.testing.assert_close(model.weight.grad, torch.ones(2, 2) * 2)


def _node(tmp: Path, port: int, node_rank: int, args: list[str]) -> subprocess.Popen:
    """One "machine": launch/multinode.sh with one process, rendezvous on 127.0.0.1."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", NPROC_PER_NODE="1", RDZV_ID="two-nodes",
               PYTHON_BIN_DIR=str(Path(TORCHRUN).parent))
    env.pop("WORLD_SIZE", None)
    cmd = ["bash", str(ROOT / "launch" / "multinode.sh"), "2", str(node_rank), f"127.0.0.1:{port}", *args]
    return subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_two_torchrun_nodes_equal_one_node_with_two_processes(tmp_path, world2):
    args = TWO_NODES
    outputs = ["--runs-dir", str(tmp_path / "runs"), "--checkpoints-dir", str(tmp_path / "ck"), "--run-name"]
    one_node = world2["scale-one-node"]
    assert one_node.returncode == 0, one_node.output
    port = free_port()
    nodes = [_node(tmp_path, port, rank, args + outputs + ["two-nodes"]) for rank in (0, 1)]
    try:
        logs = [node.communicate(timeout=120)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(logs)
    summary = json.loads((tmp_path / "runs" / "two-nodes" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == one_node.summary["global_step"] == 15
    two_nodes = torch.load(tmp_path / "ck" / "two-nodes" / "last.pt", weights_only=True)["model"]
    assert_close_weights(two_nodes, one_node.weights())
    assert summary["replica_checksums"] == one_node.summary["replica_checksums"]


def _hparams_records(run_dir: Path) -> tuple[dict, list[str]]:
    """(hparams of the run's session, metric tags its experiment declares), read from the event file."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import metadata

    session, metric_tags = {}, []
    for path in run_dir.glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                content = value.metadata.plugin_data.content
                if value.tag == metadata.SESSION_START_INFO_TAG:
                    info = metadata.parse_session_start_info_plugin_data(content)
                    session = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in
                               info.hparams.items()}
                elif value.tag == metadata.EXPERIMENT_TAG:
                    metric_tags = [m.name.tag for m in metadata.parse_experiment_plugin_data(content).metric_infos]
    return session, metric_tags


def test_a_diverged_run_declares_the_same_hparams_metrics(tmp_path):
    from spine.config import Config
    from spine.logger import HPARAM_METRICS, RunLogger

    outcomes = {"train_loss": None, "val_loss": None, "diverged": 1.0}
    logger = RunLogger(tmp_path, enabled=True, tensorboard=True, purge_step=None, keep_epochs=0)
    logger.hparams(dict(Config(lr=0.1).to_dict(), world_size=2), outcomes)
    logger.close()
    session, tags = _hparams_records(tmp_path)
    assert session["lr"] == 0.1 and session["world_size"] == 2.0
    assert tags == [tag for tag, _, _ in HPARAM_METRICS]


@pytest.mark.experiment
@pytest.mark.timeout(300)
def test_the_sweep_runs_measures_and_reports_on_a_tiny_config(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launch.scale", "--size", "tiny", "--out", str(tmp_path),
                           "--worlds", "1,2"], capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "runs.csv").open()))
    assert {r["group"] for r in rows} == {"data", "batch", "world", "accum"}
    assert all(r["returncode"] == "0" and r["samples_per_sec"] for r in rows)
    assert {r["world"] for r in rows if r["group"] == "world"} == {"1", "2"}
    assert len({r["n_samples"] for r in rows if r["group"] == "data"}) == 3
    # Accumulation reaches the same global batch as the real one: same seed, same losses (float tolerance).
    for acc in (r for r in rows if r["group"] == "accum"):
        real = next(r for r in rows if r["group"] == "world" and r["world"] == "1" and r["threads"] == "1"
                    and r["seed"] == acc["seed"] and r["global_batch"] == acc["global_batch"])
        assert int(acc["grad_accum_steps"]) > 1
        assert float(acc["final_train_loss"]) == pytest.approx(float(real["final_train_loss"]), rel=1e-5)
    probes = json.loads((tmp_path / "probe.json").read_text())
    assert {p["world"] for p in probes} == {1, 2}
    assert all(p["compute_ms"] > 0 and p["synced_ms"] > 0 for p in probes)
    summary = (tmp_path / "summary.md").read_text()
    for heading in ("### Dataset size", "### Batch size", "### World size and accumulation", "R² = "):
        assert heading in summary
    for png in ("epoch_time_vs_dataset_size", "throughput_vs_batch", "throughput_vs_world_size",
                "steps_to_target_vs_batch", "seed_spread_vs_batch"):
        assert (tmp_path / f"{png}.png").stat().st_size > 10_000, png
    # Every run is in TensorBoard's HParams dashboard with its configuration and outcomes.
    session, tags = _hparams_records(tmp_path / "scale-runs" / "runs" / rows[-1]["name"])
    assert session["world_size"] == float(rows[-1]["world"]) and session["grad-accum-steps"] > 1
    assert {"loss/train", "loss/val", "perf/samples_per_sec"} <= set(tags)
