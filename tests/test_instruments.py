"""spine/instruments: each instrument against an exact computation; the distributed paths with real gloo ranks."""

from __future__ import annotations

import copy
import gc
import io
import math
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, vmap
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler

from spine.instruments.guards import Guards
from spine.instruments.layer_stats import LayerStats
from spine.instruments.lr_find import LRRangeTest, plot_lr_range
from spine.instruments.noise_scale import (
    DDPGradNoise,
    DeferredFlush,
    MicroBatchGradNoise,
    NoiseScaleEstimator,
    two_batch_estimates,
)
from spine.instruments.sharpness import top_hessian_eigenvalue
from tests.helpers import spawn_ranks


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


# ---------------------------------------------------------------------------------------------- noise scale


def noise_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def exact_noise_scale(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """tr(Sigma) / |G|^2 from every per-example gradient (torch.func: vmap over grad), in float64."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def one_loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_example = vmap(grad(one_loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(len(x), -1) for g in per_example.values()], 1).double()
    mean = flat.mean(0)
    trace_sigma = ((flat - mean) ** 2).sum(1).mean().item()  # population covariance of the n per-example grads
    g2 = mean.dot(mean).item()
    return {"b_simple": trace_sigma / g2, "g2": g2, "trace_sigma": trace_sigma}


@pytest.fixture(scope="module")
def noise_problem() -> dict:
    """4,000 noisy-teacher samples and an MLP after 20 Adam steps: B_simple ~ 60, between b = 32 and B = 256
    (at initialisation it is ~ 9, below both batch sizes, where the two-batch estimate says little)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = torch.randn(4000, 8, generator=g)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    with torch.no_grad():
        y = teacher(x).argmax(1)
    flip = torch.rand(4000, generator=g) < 0.2
    y[flip] = torch.randint(0, 4, (int(flip.sum()),), generator=g)
    model = noise_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(20):
        idx = torch.randint(0, 4000, (64,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
    exact = exact_noise_scale(model, x, y)
    assert 32 < exact["b_simple"] < 256, exact
    return {"state": copy.deepcopy(model.state_dict()), "x": x, "y": y, "exact": exact}


def sq_grad_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return sum(p.grad.double().square().sum() for p in model.parameters()).item()


def test_two_batch_estimates_recover_g2_and_trace_from_exact_expectations():
    # E|G_b|^2 = |G|^2 + tr/b exactly: the formulas must invert it.
    g2, trace = 0.5, 30.0
    est_g2, est_trace = two_batch_estimates(g2 + trace / 32, 32, g2 + trace / 256, 256)
    assert math.isclose(est_g2, g2, rel_tol=1e-12) and math.isclose(est_trace, trace, rel_tol=1e-12)
    with pytest.raises(ValueError):
        two_batch_estimates(1.0, 64, 1.0, 32)


def test_noise_scale_estimator_matches_per_example_gradients(noise_problem):
    model = noise_mlp()
    model.load_state_dict(noise_problem["state"])
    x, y = noise_problem["x"], noise_problem["y"]
    g = torch.Generator().manual_seed(1)
    estimator = NoiseScaleEstimator(ema=0.99)
    assert estimator.result() == {"b_simple": None, "g2": None, "trace_sigma": None}
    for _ in range(300):  # independent draws of b = 32 and B = 256
        perm = torch.randperm(len(x), generator=g)
        small, big = perm[:32], perm[32:288]
        estimator.update(sq_grad_norm(model, x[small], y[small]), 32, sq_grad_norm(model, x[big], y[big]), 256)
    exact = noise_problem["exact"]["b_simple"]
    measured = estimator.result()["b_simple"]
    print(f"B_simple: estimator {measured:.1f}, exact {exact:.1f}")
    assert rel_err(measured, exact) < 0.25, (measured, exact)


def test_noise_scale_estimator_state_dict_resumes_exactly():
    g = torch.Generator().manual_seed(2)
    draws = [(1.0 + torch.rand((), generator=g).item(), 0.2 + 0.1 * torch.rand((), generator=g).item())
             for _ in range(10)]
    straight = NoiseScaleEstimator(ema=0.9)
    for small, big in draws:
        straight.update(small, 32, big, 256)
    first = NoiseScaleEstimator(ema=0.9)
    for small, big in draws[:5]:
        first.update(small, 32, big, 256)
    buffer = io.BytesIO()
    torch.save({"noise": first.state_dict()}, buffer)
    buffer.seek(0)
    resumed = NoiseScaleEstimator(ema=0.5)  # the saved ema must win
    resumed.load_state_dict(torch.load(buffer, weights_only=True)["noise"])
    for small, big in draws[5:]:
        resumed.update(small, 32, big, 256)
    assert resumed.result() == straight.result()
    assert resumed.state_dict() == straight.state_dict()


def accumulation_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, micro: int,
                      noise: MicroBatchGradNoise | None) -> torch.Tensor:
    """The loop's world-1 accumulation step: micro-batch losses weighted by their share, .grad = step mean."""
    model.zero_grad(set_to_none=True)
    for micro_idx in idx.split(micro):
        weight = len(micro_idx) / len(idx)
        loss = F.cross_entropy(model(x[micro_idx]), y[micro_idx]) * weight
        with noise.micro_batch(weight, len(micro_idx)) if noise else nullcontext():
            loss.backward()
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    if noise:
        noise.step_done(grad_norm)
    return grad_norm


def test_accumulation_source_is_exact_on_one_step_and_changes_no_gradient(noise_problem):
    model = noise_mlp()
    model.load_state_dict(noise_problem["state"])
    x, y = noise_problem["x"], noise_problem["y"]
    idx = torch.arange(100, 200)  # 100 = 3 micro-batches of 32 and a short one of 4: two sizes in one step

    accumulation_step(model, x, y, idx, 32, None)
    plain_grads = [p.grad.clone() for p in model.parameters()]
    noise = MicroBatchGradNoise(model.parameters())
    accumulation_step(model, x, y, idx, 32, noise)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), plain_grads, strict=True))

    big = sum(g.double().square().sum() for g in plain_grads).item()
    expected = [two_batch_estimates(sq_grad_norm(model, x[m], y[m]), len(m), big, len(idx)) for m in idx.split(32)]
    g2, trace = noise.collect()
    assert math.isclose(g2, sum(e[0] for e in expected) / 4, rel_tol=1e-5)
    assert math.isclose(trace, sum(e[1] for e in expected) / 4, rel_tol=1e-5)
    assert noise.collect() is None  # collect empties it

    # measure = False leaves a step out: the first step alone, the same numbers.
    sparse = MicroBatchGradNoise(model.parameters())
    accumulation_step(model, x, y, idx, 32, sparse)
    sparse.measure = False
    accumulation_step(model, x, y, idx + 100, 32, sparse)
    assert sparse.collect() == pytest.approx((g2, trace), rel=1e-6)

    # Backwards outside micro_batch() (here: the sharpness instrument's double backward) are not measured.
    top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x[:64], y[:64], iters=3)
    assert noise.collect() is None
    assert all(not p._backward_hooks for p in model.parameters())  # the hooks live only inside micro_batch()


def test_accumulation_source_noise_scale_matches_per_example_gradients(noise_problem):
    model = noise_mlp()
    model.load_state_dict(noise_problem["state"])
    x, y = noise_problem["x"], noise_problem["y"]
    noise, estimator = MicroBatchGradNoise(model.parameters()), NoiseScaleEstimator(ema=0.9)
    g = torch.Generator().manual_seed(3)
    for step in range(1, 101):  # steps of B = 256 as 8 micro-batches of b = 32; the weights stay fixed
        accumulation_step(model, x, y, torch.randperm(len(x), generator=g)[:256], 32, noise)
        if step % 10 == 0:  # the loop's logging cadence
            assert noise.flush_into(estimator)
    exact = noise_problem["exact"]["b_simple"]
    measured = estimator.result()["b_simple"]
    print(f"B_simple through micro-batch hooks: {measured:.1f}, exact {exact:.1f}")
    assert rel_err(measured, exact) < 0.25, (measured, exact)


# ---------------------------------------------------------------------------------------------- layer stats


def relu_net() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def test_layer_stats_against_direct_computation():
    model = relu_net()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    stats = LayerStats(model)

    stats.begin_step()
    assert stats.active
    hidden = model[0](x)  # the direct computation, outside the hooks' view: same numbers
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    stats.before_optimizer_step()
    optimizer.step()
    tags = stats.end_step()

    for name, p in model.named_parameters():
        layer, leaf = name.rsplit(".", 1)
        group = f"layers.{layer}/{leaf}"
        assert math.isclose(tags[f"{group}.grad_norm"], grads[name].double().norm().item(), rel_tol=1e-12)
        assert math.isclose(tags[f"{group}.norm"], before[name].double().norm().item(), rel_tol=1e-12)
        ratio = (p.detach() - before[name]).double().norm() / before[name].double().norm()
        assert math.isclose(tags[f"{group}.update_ratio"], ratio.item(), rel_tol=1e-12)
        assert tags[f"{group}.update_ratio"] > 0
    relu = hidden.relu()
    for layer, out in (("0", hidden), ("1", relu), ("2", logits)):
        assert math.isclose(tags[f"layers.{layer}/act.mean"], out.double().mean().item(), rel_tol=1e-9)
        assert math.isclose(tags[f"layers.{layer}/act.std"], out.double().std(correction=0).item(), rel_tol=1e-9)
    dead = (relu == 0).all(0).double().mean().item()
    assert tags["layers.1/dead_fraction"] == dead
    assert "layers.0/dead_fraction" not in tags  # only ReLU modules count dead units

    # The hooks are gone: nothing is registered, and later forwards are not seen.
    assert not stats.active
    assert all(not m._forward_hooks for m in model.modules())
    model(x)
    assert stats.end_step() == {}


def test_layer_stats_dead_fraction_on_hand_built_units():
    linear = nn.Linear(3, 4)
    with torch.no_grad():
        linear.weight.fill_(0.01)
        linear.bias.copy_(torch.tensor([-100.0, -100.0, 100.0, 100.0]))
    model = nn.Sequential(linear, nn.ReLU())
    x = torch.randn(8, 3)
    for bias, dead in (([-100.0, -100.0, 100.0, 100.0], 0.5), ([-100.0] * 4, 1.0), ([100.0] * 4, 0.0)):
        with torch.no_grad():
            linear.bias.copy_(torch.tensor(bias))
        stats = LayerStats(model)
        stats.begin_step()
        model(x)
        assert stats.end_step()["layers.1/dead_fraction"] == dead

    # Conv feature maps: a unit is a channel, dead only if zero at every sample and every position.
    conv = nn.Conv2d(1, 3, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 1.0, 1.0]).view(3, 1, 1, 1))
        conv.bias.copy_(torch.tensor([-100.0, 0.0, 100.0]))
    image = torch.zeros(2, 1, 4, 4)
    image[1, 0, 2, 3] = 1.0  # channel 1 is positive at this one position only: alive
    model = nn.Sequential(conv, nn.ReLU())
    stats = LayerStats(model)
    stats.begin_step()
    model(image)
    assert stats.end_step()["layers.1/dead_fraction"] == pytest.approx(1 / 3)


def test_layer_stats_combine_micro_batches_exactly():
    model = relu_net()
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(5))
    stats = LayerStats(model)
    stats.begin_step()
    model(x[:5])
    model(x[5:])  # accumulation: two forwards in one step
    split = stats.end_step()
    stats.begin_step()
    model(x)
    whole = stats.end_step()
    assert split.keys() == whole.keys()
    # float32 tolerance: a forward of 5 rows and one of 12 may take different BLAS kernels and round differently
    # (seen at 5e-9 relative). Pooling the halves wrongly (a mean of the two means) is off by ~1e-1.
    for tag in whole:
        assert math.isclose(split[tag], whole[tag], rel_tol=1e-6, abs_tol=1e-9), tag


# ---------------------------------------------------------------------------------------------- lr range test


def test_lr_schedule_hits_both_ends_exactly_and_is_geometric():
    test = LRRangeTest(lr_min=1e-7, lr_max=10.0, num_steps=100)
    lrs = [test.lr_at(i) for i in range(100)]
    assert lrs[0] == 1e-7 and lrs[-1] == 10.0
    ratios = [b / a for a, b in zip(lrs, lrs[1:], strict=False)]
    assert max(ratios) / min(ratios) - 1 < 1e-9
    # The loop's view: next_lr walks the schedule, and the test ends at lr_max.
    seen = []
    while (lr := test.next_lr) is not None:
        seen.append(lr)
        test.record(lr, 1.0)
    assert seen == lrs and test.stop_reason == "reached lr_max"


def test_lr_range_stop_rule():
    test = LRRangeTest(num_steps=100, smoothing=0.9)
    for _ in range(10):
        assert not test.record(test.next_lr, 1.0)
    # Smoothed (bias-corrected) after the jump: (0.9 * (1 - 0.9^10) + 0.1 * 100) / (1 - 0.9^11) = 15.4 > 4 x 1.
    assert test.record(test.next_lr, 100.0)
    assert len(test.losses) == 11 and "> 4 x best" in test.stop_reason
    assert test.next_lr is None
    with pytest.raises(RuntimeError):
        test.record(1.0, 1.0)

    slow = LRRangeTest(num_steps=100, smoothing=0.9)  # a rise to 3.5x the best does not stop it
    for i in range(100):
        if slow.record(slow.next_lr, 1.0 if i < 50 else 3.5):
            break
    assert slow.stop_reason == "reached lr_max"

    nan = LRRangeTest()
    nan.record(nan.next_lr, 1.0)
    assert nan.record(nan.next_lr, float("nan")) and "non-finite" in nan.stop_reason


def synthetic_range_curve(log_lr: float, centre: float) -> float:
    """Falls fastest at log10 lr = centre (a tanh step), then blows up two decades later."""
    return 2.0 - math.tanh(2.0 * (log_lr - centre)) + max(0.0, math.exp(3.0 * (log_lr - centre - 2.0)) - 1.0)


@pytest.mark.parametrize("noise", [0.0, 0.02])
def test_lr_range_suggestion_lands_at_the_steepest_descent(noise, tmp_path):
    g = torch.Generator().manual_seed(5)
    centre = -3.0  # steepest descent at lr = 1e-3
    test = LRRangeTest(lr_min=1e-7, lr_max=10.0, num_steps=100)
    while (lr := test.next_lr) is not None:
        loss = synthetic_range_curve(math.log10(lr), centre) * (1 + noise * torch.randn((), generator=g).item())
        if test.record(lr, loss):
            break
    assert test.stop_reason.startswith("smoothed loss")  # the blow-up stopped it before lr_max
    grid_step = 8 / 99  # decades between two lrs of the schedule
    suggestion = test.suggestion()
    assert abs(math.log10(suggestion) - centre) <= (1 if noise == 0 else 2) * grid_step + 1e-9, suggestion

    png = plot_lr_range(test, tmp_path / "lr_find.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    flat = LRRangeTest(num_steps=20)  # a loss that never falls has no suggestion
    while (lr := flat.next_lr) is not None:
        flat.record(lr, 1.0 + math.log10(lr) * 0.01 + 0.2)
    assert flat.suggestion() is None


# ---------------------------------------------------------------------------------------------- guards


class GuardedLoop:
    """A few epochs of the loop's calls, with the guards where the loop puts them, and one mistake at a time."""

    def __init__(self, mistake: str = "") -> None:
        torch.manual_seed(6)
        self.model = nn.Sequential(nn.Linear(2, 4), nn.Dropout(0.1), nn.Linear(4, 2))
        self.params = list(self.model.parameters())
        self.optimizer = torch.optim.SGD(self.params, lr=0.1)
        self.sampler = DistributedSampler(range(8), num_replicas=1, rank=0, shuffle=True, seed=0)
        self.warned: list[str] = []
        self.guards = Guards(warn=self.warned.append)
        self.mistake = mistake

    def run(self, epochs: int = 3, steps: int = 2) -> None:
        x, y = torch.randn(8, 2), torch.randint(0, 2, (8,))
        step = 0
        for epoch in range(epochs):
            if self.mistake != "no-set-epoch":
                self.sampler.set_epoch(epoch)
            self.guards.sampler_epoch(self.sampler, epoch)
            if self.mistake != "no-train-mode":
                self.model.train()
            for _ in range(steps):
                self.guards.before_step(self.model, self.params, step)  # as Instruments.step_start calls them
                F.cross_entropy(self.model(x), y).backward()
                self.optimizer.step()
                if self.mistake != "no-zero-grad":
                    self.optimizer.zero_grad(set_to_none=True)
                step += 1
            if self.mistake != "no-eval-mode":
                self.model.eval()
            self.guards.validation_mode(self.model, epoch)
            with torch.no_grad():
                self.model(x)


def test_guards_stay_silent_on_a_healthy_loop():
    loop = GuardedLoop()
    loop.run()
    assert loop.guards.messages == [] and loop.warned == []


@pytest.mark.parametrize("mistake, check, when, line", [
    ("no-train-mode", "eval-mode-training", "step 2 ", "model.train()"),  # epoch 0 is in train mode by default
    ("no-zero-grad", "grad-not-cleared", "step 1 ", "optimizer.zero_grad(set_to_none=True)"),
    ("no-set-epoch", "sampler-epoch", "epoch 1 ", "sampler.set_epoch(epoch)"),
    ("no-eval-mode", "train-mode-validation", "epoch 0", "model.eval()"),
])
def test_each_guard_fires_once_at_the_step_and_names_the_line(mistake, check, when, line):
    loop = GuardedLoop(mistake)
    loop.run(epochs=4)  # the mistake repeats every step or epoch after the first
    assert len(loop.guards.messages) == 1, loop.guards.messages
    message = loop.guards.messages[0]
    assert message.startswith(f"guard {check}: ") and when in message and line in message, message
    assert loop.warned == loop.guards.messages


def test_sharpness_between_steps_does_not_trip_the_zero_grad_guard():
    loop = GuardedLoop()
    loop.run(epochs=1)
    top_hessian_eigenvalue(loop.model, nn.CrossEntropyLoss(), torch.randn(8, 2), torch.randint(0, 2, (8,)), iters=5)
    loop.guards.grads_cleared(loop.params, step=99)
    assert loop.guards.messages == []


# ---------------------------------------------------------------------------------------------- two gloo ranks
# One spawn of two real gloo processes runs every distributed check (a spawn costs seconds of imports on
# this machine); each test below asserts one part of what the ranks report.


@contextmanager
def gloo_group(rank: int, world: int):
    """A real gloo process group from the env spawn_ranks sets (MASTER_ADDR=127.0.0.1, a free port), bounded."""
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        yield
    finally:
        gc.collect()  # DDP's reducer sits in reference cycles: free it before the group goes
        dist.destroy_process_group()


def dead_on_one_half_problem():
    """A ReLU net and 16 samples where hidden unit 0 is dead on the first half and alive on the second: the
    rank-local dead fraction of rank 0 differs from the global one."""
    model = relu_net()
    with torch.no_grad():
        model[0].weight[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
        model[0].bias[0] = 0.0
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(7))
    x[:8, 0] = -x[:8, 0].abs()
    x[8:, 0] = x[8:, 0].abs()
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(8))
    return model, x, y


def layer_stats_step(model: nn.Module, module: nn.Module, x: torch.Tensor, y: torch.Tensor, all_reduce=None):
    """One logged SGD step with LayerStats; `model` runs (DDP or plain), `module` is the unwrapped one."""
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    stats = LayerStats(module)
    stats.begin_step()
    F.cross_entropy(model(x), y).backward()
    stats.before_optimizer_step()
    optimizer.step()
    return stats.end_step(all_reduce)


def ddp_noise_steps(rank: int, world: int, state: dict, x: torch.Tensor, y: torch.Tensor, every: int,
                    steps: int, lr: float, accumulate: int, seed: int, flush_every: int = 0, deferred: bool = False):
    """DDP steps of 64 samples per rank, the noise source measuring one step in `every` (0: never, plain DDP);
    accumulation under no_sync. Flushes every `flush_every` steps, blocking or (`deferred`) as the loop does."""
    from spine.distributed import all_reduce_sum

    module = noise_mlp()
    module.load_state_dict(state)
    model = DDP(module, bucket_cap_mb=0.004)  # ~1,000 floats per bucket: several buckets, rebuilt after step 1
    noise, estimator = DDPGradNoise(module.parameters()), NoiseScaleEstimator(ema=0.9)
    deferred_flush, fed_at = DeferredFlush(noise, estimator, torch.device("cpu")), []
    optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    local_norms = []
    for step in range(1, steps + 1):
        idx = torch.randperm(len(x), generator=g)[:64 * world][rank::world]  # a shared draw; this rank's share
        micro_batches = idx.split(len(idx) // accumulate)
        noise.measure = every > 0 and (step - 1) % every == 0  # as the loop sets it: one step in `every`
        for i, micro in enumerate(micro_batches):
            with nullcontext() if i == len(micro_batches) - 1 else model.no_sync():
                loss = F.cross_entropy(model(x[micro]), y[micro]) * (len(micro) / len(idx))
                with noise.backward() if every else nullcontext():
                    loss.backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in module.parameters()])
        if every:
            local_norms.append(None if noise.local_sq_norm is None else noise.local_sq_norm.item())
            noise.step_done(grad_norm, len(idx), len(idx) * world)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if flush_every and step % flush_every == 0 and deferred:
            fed_at.append(deferred_flush.flush(step))
        elif flush_every and step % flush_every == 0:
            noise.flush_into(estimator, all_reduce_sum)
    if deferred:
        fed_at.append(deferred_flush.finish())
        assert fed_at == [None] + list(range(flush_every, steps + 1, flush_every)), fed_at  # one interval behind
    return module, local_norms, estimator.result()


def _distributed_checks(rank: int, world: int, payload: dict) -> dict:
    from spine.distributed import all_reduce_sum

    out = {}
    with gloo_group(rank, world):
        # Sharpness: uneven shards (the count must be reduced too), chunked.
        model, x, y, split = payload["sharpness"]
        shard = slice(0, split) if rank == 0 else slice(split, None)
        out["sharpness"] = top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x[shard], y[shard], batch_size=4,
                                                  all_reduce=all_reduce_sum)

        # Layer stats of a DDP step, activations reduced over ranks.
        state, x, y = payload["layer_stats"]
        model = relu_net()
        model.load_state_dict(state)  # a copy: the spawn shares the parent's tensors with both ranks
        half = slice(8 * rank, 8 * rank + 8)
        out["layer_stats"] = layer_stats_step(DDP(model), model, x[half], y[half], all_reduce_sum)

        # Noise hook: training with and without it (plain steps and no_sync accumulation).
        state, x, y = payload["noise"]
        trained, measured = {}, {}
        for every, accumulate in ((0, 1), (0, 2), (1, 1), (1, 2), (2, 2)):
            module, local_norms, _ = ddp_noise_steps(rank, world, state, x, y, every, 4, 0.1, accumulate, 9)
            # Plain lists: a tensor sent back through the queue would need this process alive to be read.
            trained[every, accumulate] = [p.detach().tolist() for p in module.parameters()]
            measured[every, accumulate] = [norm is not None for norm in local_norms]
        out["trained"], out["measured_steps"] = trained, measured

        # The hook's local squared norm against this rank's local gradient computed without DDP.
        module, local_norms, _ = ddp_noise_steps(rank, world, state, x, y, 1, 1, 0.0, 2, 10)
        g = torch.Generator().manual_seed(10)
        idx = torch.randperm(len(x), generator=g)[:64 * world][rank::world]
        alone = noise_mlp()
        alone.load_state_dict(state)
        out["local_sq"] = (local_norms[0], sq_grad_norm(alone, x[idx], y[idx]))

        # B_simple at fixed weights (lr 0): b = 64 per rank (2 micro-batches of 32 under no_sync), B = 128.
        _, _, result = ddp_noise_steps(rank, world, state, x, y, 1, 200, 0.0, 2, 11, flush_every=20)
        out["noise"] = result
        # The loop's non-blocking flush feeds the estimator the same numbers, one interval later.
        _, _, out["noise_deferred"] = ddp_noise_steps(rank, world, state, x, y, 1, 200, 0.0, 2, 11, flush_every=20,
                                                      deferred=True)
    return out


@pytest.fixture(scope="module")
def two_ranks(noise_problem) -> tuple[list[dict], dict]:
    sharpness_model, sx, sy = small_mlp_problem()
    stats_model, lx, ly = dead_on_one_half_problem()
    payload = {"sharpness": (sharpness_model, sx, sy, 11),
               "layer_stats": (stats_model.state_dict(), lx, ly),
               "noise": (noise_problem["state"], noise_problem["x"], noise_problem["y"])}
    per_rank = spawn_ranks(_distributed_checks, 2, payload, timeout=90)
    return per_rank, {"sharpness": (sharpness_model, sx, sy), "layer_stats": (stats_model, lx, ly)}


@pytest.mark.timeout(120)
def test_sharpness_on_two_ranks_equals_world_one(two_ranks):
    per_rank, problems = two_ranks
    model, x, y = problems["sharpness"]
    single = top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x, y)
    assert per_rank[0]["sharpness"] == per_rank[1]["sharpness"]  # the same reduced numbers on every rank
    assert rel_err(per_rank[0]["sharpness"], single) < 1e-5, (per_rank[0]["sharpness"], single)


@pytest.mark.timeout(120)
def test_layer_stats_under_ddp_equal_the_global_batch(two_ranks):
    per_rank, problems = two_ranks
    model, x, y = problems["layer_stats"]
    rank0_model = copy.deepcopy(model)
    whole = layer_stats_step(model, model, x, y)  # world 1 on all 16 samples
    rank0_alone = layer_stats_step(rank0_model, rank0_model, x[:8], y[:8])
    for tags in per_rank:
        assert tags["layer_stats"].keys() == whole.keys()
        for tag, value in whole.items():
            assert math.isclose(tags["layer_stats"][tag], value, rel_tol=1e-5, abs_tol=1e-9), tag
    # Not vacuous: rank 0's own activations say something else (its half has unit 0 dead).
    assert rank0_alone["layers.1/dead_fraction"] > whole["layers.1/dead_fraction"]


@pytest.mark.timeout(120)
def test_ddp_noise_hook_leaves_training_bit_identical(two_ranks, noise_problem):
    """Weights as lists of Python floats (exact copies of the float32 values): == is bitwise equality."""
    per_rank, _ = two_ranks
    initial = [t.tolist() for t in noise_problem["state"].values()]
    for r in per_rank:
        trained = r["trained"]
        for every, accumulate in ((1, 1), (1, 2), (2, 2)):  # against plain DDP (every = 0)
            assert trained[every, accumulate] == trained[0, accumulate], (every, accumulate)
        assert trained[0, 1] != initial and trained[0, 1] != trained[0, 2]  # it trained, on different steps
        # Measuring one step in two measures the synchronised steps 1 and 3 only.
        assert r["measured_steps"] == {(0, 1): [], (0, 2): [], (1, 1): [True] * 4, (1, 2): [True] * 4,
                                       (2, 2): [True, False, True, False]}
    assert per_rank[0]["trained"] == per_rank[1]["trained"]  # and the replicas agree


@pytest.mark.timeout(120)
def test_ddp_noise_hook_sees_the_local_gradient(two_ranks):
    per_rank, _ = two_ranks
    for r in per_rank:
        hooked, direct = r["local_sq"]
        assert math.isclose(hooked, direct, rel_tol=1e-5), (hooked, direct)
    assert per_rank[0]["local_sq"][1] != per_rank[1]["local_sq"][1]  # the ranks' local batches differ


@pytest.mark.timeout(120)
def test_ddp_noise_scale_matches_per_example_gradients(two_ranks, noise_problem):
    per_rank, _ = two_ranks
    assert per_rank[0]["noise"] == per_rank[1]["noise"]
    assert per_rank[0]["noise_deferred"] == per_rank[0]["noise"]  # bit for bit
    exact = noise_problem["exact"]["b_simple"]
    measured = per_rank[0]["noise"]["b_simple"]
    print(f"B_simple through the DDP parameter hooks at world 2: {measured:.1f}, exact {exact:.1f}")
    assert rel_err(measured, exact) < 0.25, (measured, exact)
