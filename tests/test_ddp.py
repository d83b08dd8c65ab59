"""Distributed behaviour proven against a single-process reference, as PyTorch's own DDP tests do."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import run_train, spawn_ranks

# 160 training samples: 5 steps per epoch at a global batch of 32, so 5 epochs = 25 steps.
COMMON = ["--dataset", "moons", "--n-samples", "200", "--epochs", "5", "--no-tensorboard", "--seed", "3"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("optimizer", [["--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9"],
                                       ["--optimizer", "adam", "--lr", "0.01"]], ids=["sgd", "adam"])
def test_world2_equals_world1_on_the_same_global_batch(tmp_path, optimizer):
    ddp = run_train(tmp_path, COMMON + optimizer + ["--batch-size", "16"], world=2, name="ddp")
    single = run_train(tmp_path, COMMON + optimizer + ["--batch-size", "32"], world=1, name="single")
    assert ddp.returncode == 0, ddp.stderr
    assert single.returncode == 0, single.stderr
    assert ddp.summary["global_step"] == single.summary["global_step"] == 25
    a, b = ddp.weights(), single.weights()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1.3e-6, atol=1e-5, msg=name)
    # Replicas stay bitwise identical: DDP applies the same averaged gradient on every rank.
    checksums = ddp.summary["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]

    # Control: the comparison is sensitive. Half the global batch gives visibly different weights.
    half = run_train(tmp_path, COMMON + optimizer + ["--batch-size", "16"], world=1, name="half")
    assert half.returncode == 0, half.stderr
    assert any(not torch.allclose(half.weights()[k], b[k], rtol=1.3e-6, atol=1e-5) for k in b)


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


@pytest.mark.timeout(120)
def test_ranks_with_different_data_fail_fast(tmp_path, capfd):
    codes = spawn_ranks(_main_with_data_seed, 2, str(tmp_path))
    assert codes == [1, 1]
    assert "ranks built different datasets" in capfd.readouterr().err
    assert not (tmp_path / "ck").exists()
