"""spine/instruments: each instrument against an exact computation; the distributed paths with real gloo ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

from spine.instruments.sharpness import top_hessian_eigenvalue


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is fastest, and on a 2-core machine shared with the gloo ranks, much steadier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ---------------------------------------------------------------------------------------------- sharpness


def quadratic_problem(eigenvalues: list[float], seed: int = 0):
    """A linear "model" and a loss whose Hessian is exactly A = Q diag(eigenvalues) Q^T.

    Row i of x is sqrt(n |l_i|) q_i and y_i = sign(l_i); with loss = 0.5 * mean(y * (x w)^2) the Hessian of
    the mean over the n rows is sum_i l_i q_i q_i^T, whatever w is.
    """
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    lam = torch.tensor(eigenvalues, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    x = ((n * lam.abs()).sqrt()[:, None] * q.T).float()
    y = lam.sign().float()
    model = nn.Linear(n, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, n, generator=g))
    loss_fn = lambda pred, sign: 0.5 * (sign * pred.squeeze(-1) ** 2).mean()
    return model, loss_fn, x, y


@pytest.mark.parametrize("eigenvalues, top", [([4.0, 2.5, 1.0, 0.5, -1.5, 0.1], 4.0),
                                              ([-6.0, 3.0, 1.0, 0.2, -0.5], 3.0)],
                         ids=["dominant-positive", "dominant-negative"])
def test_sharpness_of_a_quadratic_is_its_top_eigenvalue(eigenvalues, top):
    model, loss_fn, x, y = quadratic_problem(eigenvalues)
    value = top_hessian_eigenvalue(model, loss_fn, x, y)
    # The negative case: power iteration alone finds -6 (largest magnitude); the shift must find +3.
    assert rel_err(value, top) < 1e-4, value


def small_mlp_problem(seed: int = 0, n: int = 20):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(n, 3), torch.randint(0, 3, (n,))
    return model, x, y


def exact_top_eigenvalue(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest eigenvalue of torch.func.hessian of the mean cross-entropy over flattened parameters, in float64."""
    params = {name: p.detach().double() for name, p in model.named_parameters()}
    shapes = {name: p.shape for name, p in params.items()}
    flat = torch.cat([p.reshape(-1) for p in params.values()])

    def loss_of(vector: torch.Tensor) -> torch.Tensor:
        pieces, offset = {}, 0
        for name, shape in shapes.items():
            pieces[name] = vector[offset:offset + shape.numel()].view(shape)
            offset += shape.numel()
        return F.cross_entropy(functional_call(model, pieces, (x.double(),)), y)

    return torch.linalg.eigvalsh(hessian(loss_of)(flat))[-1].item()


def test_sharpness_of_an_mlp_matches_torch_func_hessian():
    model, x, y = small_mlp_problem()
    exact = exact_top_eigenvalue(model, x, y)
    value = top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x, y)
    assert exact > 0.05  # a real curvature, not a degenerate zero
    assert rel_err(value, exact) < 1e-3, (value, exact)


def test_sharpness_chunked_equals_unchunked():
    model, x, y = small_mlp_problem()
    whole = top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x, y)
    chunked = top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x, y, batch_size=7)  # 7 + 7 + 6: uneven
    assert rel_err(chunked, whole) < 1e-5, (chunked, whole)


class DrawsRandomNumbers(nn.Module):
    """Draws from the global RNG at every forward, in any mode (as noise layers and augmentations can)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.rand(1)
        return x


def test_sharpness_leaves_rng_grads_and_modes_as_they_were():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), DrawsRandomNumbers(), nn.Dropout(0.5),
                          nn.Linear(8, 3))
    model.train()
    model[1].eval()  # a submodule held in eval on purpose must stay so
    x, y = torch.randn(16, 3), torch.randint(0, 3, (16,))
    model[0].weight.grad = torch.full_like(model[0].weight, 0.25)
    kept_grad = model[0].weight.grad
    running_mean = model[1].running_mean.clone()
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()

    value = top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x, y)

    assert math.isfinite(value) and value > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert model[0].weight.grad is kept_grad and torch.equal(kept_grad, torch.full_like(kept_grad, 0.25))
    assert all(p.grad is None for name, p in model.named_parameters() if name != "0.weight")  # None stays None
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model[1].running_mean, running_mean)
    # Measured in eval mode: dropout off, so the answer is deterministic.
    assert top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x, y) == value


def test_training_with_sharpness_measurements_is_bit_identical_to_training_without():
    def train(measure: bool) -> list[torch.Tensor]:
        torch.manual_seed(2)
        model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), DrawsRandomNumbers(), nn.Dropout(0.3), nn.Linear(8, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        x, y = torch.randn(32, 3), torch.randint(0, 3, (32,))
        for step in range(6):
            model.train()
            F.cross_entropy(model(x[step::2]), y[step::2]).backward()  # dropout masks come from the global RNG
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if measure:
                top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x, y, iters=5)
        return [p.detach() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(train(False), train(True), strict=True))
