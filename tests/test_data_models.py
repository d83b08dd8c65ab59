from __future__ import annotations

import pytest
import torch

from data import DATASETS, build_dataset
from models import MODELS, build_model


@pytest.mark.parametrize("name", list(DATASETS))
def test_datasets_are_deterministic_and_shaped(name):
    dim, classes = (7, 4) if name == "rule" else (2, 2)
    a = build_dataset(name, 101, 0.2, 0.1, dim, classes, seed=3)
    b = build_dataset(name, 101, 0.2, 0.1, dim, classes, seed=3)
    c = build_dataset(name, 101, 0.2, 0.1, dim, classes, seed=4)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.val_y, b.val_y)
    assert len(a.train_x) == 81 and len(a.val_x) == 20
    assert a.train_x.shape[1] == a.in_dim == dim and a.train_x.dtype == torch.float32
    assert set(torch.cat([a.train_y, a.val_y]).tolist()) <= set(range(classes))
    assert a.num_classes == classes


def test_sorted_order_groups_the_training_set_by_class():
    d = build_dataset("moons", 200, 0.2, 0.1, 2, 2, seed=0, order="sorted")
    assert torch.equal(d.train_y, torch.sort(d.train_y).values)
    r = build_dataset("moons", 200, 0.2, 0.1, 2, 2, seed=0, order="random")
    assert not torch.equal(r.train_y, torch.sort(r.train_y).values)
    assert torch.equal(d.val_y, r.val_y)  # only the training storage order changes


def test_global_rng_does_not_leak_into_the_data():
    torch.manual_seed(0)
    a = build_dataset("spirals", 50, 0.2, 0.1, 2, 2, seed=1)
    torch.manual_seed(123)
    b = build_dataset("spirals", 50, 0.2, 0.1, 2, 2, seed=1)
    assert a.fingerprint == b.fingerprint


@pytest.mark.parametrize("name", list(MODELS))
def test_models_map_inputs_to_logits(name):
    shape = (1, 8, 8) if name == "cnn" else (5,)  # the CNN takes images; the others flatten what they are given
    model = build_model(name, shape, 3, hidden=(8, 8))
    assert model(torch.randn(4, *shape)).shape == (4, 3)


def test_dropout_and_batchnorm_make_train_and_eval_differ():
    torch.manual_seed(0)
    model = build_model("mlp", 2, 2, hidden=(16,), dropout=0.5, batchnorm=True)
    x = torch.randn(32, 2)
    model.train()
    out_train = model(x)
    model.eval()
    assert not torch.allclose(out_train, model(x))
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"BatchNorm1d", "Dropout"} <= kinds
