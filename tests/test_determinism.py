"""Same seed, same bits; the sampler's epoch and shards behave as the loop relies on."""

from __future__ import annotations

import pytest
import torch

from spine.distributed import DistContext
from tests.helpers import run_train
from train import train_sampler

ARGS = ["--epochs", "3", "--no-tensorboard", "--dropout", "0.1"]


@pytest.mark.timeout(90)
def test_same_seed_gives_bit_identical_losses_another_seed_does_not(tmp_path):
    a = run_train(tmp_path, ARGS + ["--seed", "5"], name="a")
    b = run_train(tmp_path, ARGS + ["--seed", "5"], name="b")
    c = run_train(tmp_path, ARGS + ["--seed", "6"], name="c")
    for r in (a, b, c):
        assert r.returncode == 0, r.stderr
    assert len(a.step_losses()) == 15
    assert a.step_losses() == b.step_losses()
    assert a.step_losses() != c.step_losses()


@pytest.mark.parametrize("n,world", [(160, 2), (161, 2), (100, 3)])
def test_shards_are_disjoint_and_cover_the_data(n, world):
    # train.py's own sampler, for each rank of each world size.
    for epoch in range(3):
        shards = []
        for rank in range(world):
            ctx = DistContext(rank, rank, world, world, torch.device("cpu"), "gloo", 1)
            s = train_sampler(n, ctx, seed=0)
            s.set_epoch(epoch)
            shards.append(list(s))
        assert len({len(s) for s in shards}) == 1  # equal shard sizes keep DDP's gradient average exact
        padding = len(shards[0]) * world - n
        assert padding < world
        union = [i for s in shards for i in s]
        assert set(union) == set(range(n))
        if padding == 0:
            assert len(union) == len(set(union))  # disjoint
