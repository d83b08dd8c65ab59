"""spine/instruments: each instrument against an exact computation; the distributed paths with real gloo ranks."""

from __future__ import annotations

import copy
import io
import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, vmap
from torch.utils.data import DistributedSampler

from spine.instruments.guards import Guards
from spine.instruments.layer_stats import LayerStats
from spine.instruments.lr_find import LRRangeTest, plot_lr_range
from spine.instruments.noise_scale import (
    MicroBatchGradNoise,
    NoiseScaleEstimator,
    two_batch_estimates,
)
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

    # Backwards outside micro_batch() (here: the sharpness instrument's double backward) are not measured.
    top_hessian_eigenvalue(model, nn.CrossEntropyLoss(), x[:64], y[:64], iters=3)
    assert noise.collect() is None
    noise.remove()
    assert all(not p._backward_hooks for p in model.parameters())


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
    x = torch.randn(12, 4)
    stats = LayerStats(model)
    stats.begin_step()
    model(x[:5])
    model(x[5:])  # accumulation: two forwards in one step
    split = stats.end_step()
    stats.begin_step()
    model(x)
    whole = stats.end_step()
    assert split.keys() == whole.keys()
    for tag in whole:
        assert math.isclose(split[tag], whole[tag], rel_tol=1e-9, abs_tol=1e-12), tag


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
                self.guards.training_forward(self.model, step)
                self.guards.grads_cleared(self.params, step)
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
