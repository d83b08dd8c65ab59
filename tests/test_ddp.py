"""Distributed behaviour proven against a single-process reference, as PyTorch's own DDP tests do."""

from __future__ import annotations

import math
import os

import pytest
import torch

from data import fingerprint
from tests.helpers import assert_ddp_matches_single_process, run_train, spawn_ranks, world2_run

# 160 training samples: 5 steps per epoch at a global batch of 32, so 5 epochs = 25 steps.
COMMON = ["--dataset", "moons", "--n-samples", "200", "--epochs", "5", "--no-tensorboard", "--seed", "3"]
OPTIMIZERS = {
    "sgd": ["--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9"],
    "adam": ["--optimizer", "adam", "--lr", "0.01"],
    # The grad norm here is ~0.1-1: a clip at 0.05 acts on every step, and it must act on the all-reduced gradient.
    "sgd-clipped": ["--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9", "--grad-clip", "0.05"],
}
TOLERANCE = {"rtol": 1.3e-6, "atol": 1e-5}


# World 2 at 16 per rank (the global batch of 32), in the session's one torchrun job (tests/conftest.py).
for _name, _flags in OPTIMIZERS.items():
    world2_run(f"ddp-{_name}", COMMON + _flags + ["--batch-size", "16"])
world2_run("ddp-batchnorm", COMMON + ["--batchnorm", "--batch-size", "16"])


@pytest.mark.distributed
def test_the_world2_jobs_users_share_one_xdist_worker(request, world2):
    """The world-2 job is a session fixture: each xdist worker that runs one of its users runs the whole job again.
    tests/conftest.py marks its users (this test is one) as one xdist_group; under make test's --dist loadgroup,
    xdist must also have put the group into their node ids, which is what it schedules by (pytest 9.2 with
    xdist 3.8 did not, silently)."""
    users = [item for item in request.session.items if "world2" in item.fixturenames]
    assert request.node in users
    for item in users:
        assert [m.args for m in item.iter_markers("xdist_group")] == [("world2",)], item.nodeid
    if os.environ.get("PYTEST_XDIST_WORKER") and request.config.getoption("dist", "no") == "loadgroup":
        assert all(item.nodeid.endswith("@world2") for item in users), [item.nodeid for item in users]


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_world2_equals_world1_on_the_same_global_batch(tmp_path, world2, optimizer):
    ddp = world2[f"ddp-{optimizer}"]
    single = run_train(tmp_path, COMMON + OPTIMIZERS[optimizer] + ["--batch-size", "32"], name="single")
    assert_ddp_matches_single_process(ddp, single, 25, TOLERANCE)
    a, b = ddp.weights(), single.weights()

    # Control: the comparison is sensitive. Half the global batch gives visibly different weights.
    half = run_train(tmp_path, COMMON + OPTIMIZERS[optimizer] + ["--batch-size", "16"], name="half")
    assert half.returncode == 0, half.output
    assert any(not torch.allclose(half.weights()[k], b[k], **TOLERANCE) for k in b)
    if optimizer == "sgd-clipped":  # and the clip really changed the run
        unclipped = world2["ddp-sgd"].weights()
        assert any(not torch.allclose(unclipped[k], a[k], **TOLERANCE) for k in a)


@pytest.mark.distributed
def test_replica_checksums_cover_the_batchnorm_buffers_and_agree(world2):
    run = world2["ddp-batchnorm"]
    assert run.returncode == 0, run.output
    state = run.weights()
    assert any("running_mean" in k for k in state)
    checksums = run.summary["replica_checksums"]
    # The checksum is of the whole state_dict, buffers included: it equals the saved weights' and buffers' own.
    assert checksums == [fingerprint(*state.values())] * 2
    assert fingerprint(*state.values()) != fingerprint(*(v for k, v in state.items() if "running" not in k))


@pytest.mark.distributed
def test_each_epoch_visits_the_data_in_a_new_order_and_the_ranks_disjoint_shards(world2):
    run = world2["ddp-sgd"]
    orders = [m["order_fingerprint"] for m in run.metrics]
    assert len(orders) == 5 and len(set(orders)) == 5
    assert all(len(set(m["shard_fingerprints"])) == 2 for m in run.metrics)


def _evaluate_on_ranks(rank: int, world: int, sizes: list[int]) -> list[tuple[float, float]]:
    from spine.distributed import distributed_session
    from train import evaluate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x, y = torch.randn(max(sizes), 3), torch.randint(0, 4, (max(sizes),))
    with distributed_session("cpu", 1, 30) as ctx:
        assert ctx.world_size == world
        # Batch size 2 forces several forwards per rank, including a short last one.
        return [evaluate(model, x[:n], y[:n], ctx, batch_size=2) for n in sizes]


@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
def test_distributed_validation_is_exact(world):
    from spine.distributed import distributed_session
    from train import evaluate

    sizes = [1, 2, 5, 7, 9, 10]
    per_rank = spawn_ranks(_evaluate_on_ranks, world, sizes)
    assert all(r == per_rank[0] for r in per_rank), "every rank must report the same global metric"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x, y = torch.randn(max(sizes), 3), torch.randint(0, 4, (max(sizes),))
    with distributed_session("cpu", 1, 30) as ctx:
        reference = [evaluate(model, x[:n], y[:n], ctx, batch_size=1024) for n in sizes]
    for n, (loss, acc), (ref_loss, ref_acc) in zip(sizes, per_rank[0], reference, strict=True):
        assert acc == ref_acc, f"n={n}"
        assert math.isclose(loss, ref_loss, rel_tol=1e-6), f"n={n}: {loss} vs {ref_loss}"


@pytest.mark.unit
def test_padding_would_bias_the_metric():
    """The case above is not vacuous: counting DistributedSampler's padding changes the answer for 7 on 2 ranks."""
    from torch.utils.data import DistributedSampler

    shards = [list(DistributedSampler(range(7), num_replicas=2, rank=r, shuffle=False)) for r in range(2)]
    flat = shards[0] + shards[1]
    assert len(flat) == 8 and flat.count(0) == 2  # sample 0 counted twice without the mask


def _main_with_data_seed(rank: int, world: int, tmp: str) -> int:
    from train import main

    # Each rank gets a different --data-seed: exactly the bug the fingerprint check exists for.
    return main(["--data-seed", str(rank), "--epochs", "1", "--runs-dir", f"{tmp}/runs",
                 "--checkpoints-dir", f"{tmp}/ck", "--no-tensorboard"])


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_ranks_with_different_data_fail_fast(tmp_path, capfd):
    codes = spawn_ranks(_main_with_data_seed, 2, str(tmp_path))
    assert codes == [1, 1]
    assert "ranks built different datasets" in capfd.readouterr().err
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("n, world, shuffle, drop_last", [
    (10, 1, True, False), (10, 3, True, False), (10, 3, False, False), (11, 4, True, True), (2, 4, True, False),
])
def test_epoch_indices_are_the_samplers_own_order(n, world, shuffle, drop_last):
    """The loop indexes the data with a tensor rebuilt from the sampler's rule instead of iterating the
    sampler; that is only sound if the two agree index for index, at every rank, epoch and padding case."""
    from torch.utils.data.distributed import DistributedSampler

    from spine.distributed import epoch_indices
    dataset = list(range(n))
    for rank in range(world):
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=7,
                                     drop_last=drop_last)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            assert epoch_indices(sampler, torch.device("cpu")).tolist() == list(sampler)


def _world_of_the_group(rank: int, world: int) -> int:
    import torch.distributed as dist
    dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=30))
    try:
        return dist.get_world_size()
    finally:
        dist.destroy_process_group()


def _say_and_read_env(rank: int, world: int, name: str) -> str | None:
    print(f"rank {rank} of {world} writes to the test's stdout", flush=True)
    return os.environ.get(name)


@pytest.mark.distributed
def test_spawned_ranks_get_the_callers_environment_and_output_now(monkeypatch, capfd):
    """spawn_ranks forks its ranks from a server started at the first spawn: they must still see the caller's
    environment as it is at this spawn, and write where the test's output goes, as spawned processes would."""
    assert spawn_ranks(_say_and_read_env, 2, "SPINE_TEST_MARK") == [None, None]  # the server runs from here on
    monkeypatch.setenv("SPINE_TEST_MARK", "set after the server started")
    assert spawn_ranks(_say_and_read_env, 2, "SPINE_TEST_MARK") == ["set after the server started"] * 2
    out = capfd.readouterr().out
    assert all(out.count(f"rank {r} of 2 writes to the test's stdout") == 2 for r in range(2)), out


@pytest.mark.distributed
def test_spawned_ranks_retry_when_their_port_is_taken(monkeypatch):
    """free_port's port is free only until someone binds it; two xdist workers race for ports. A group whose
    store lost the race starts again on a new port instead of failing the test."""
    import socket

    from tests import helpers

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    real = helpers.free_port
    monkeypatch.setattr(helpers, "free_port", lambda: next(ports, None) or real())
    try:
        assert spawn_ranks(_world_of_the_group, 2, timeout=60) == [2, 2]
    finally:
        taken.close()
