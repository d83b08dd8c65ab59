from __future__ import annotations

import math

import pytest
import torch

from spine.optim import build_optimizer, build_scheduler, grad_accumulators, lr_factor


def test_warmup_is_linear_then_constant():
    assert [lr_factor(s, 100, "constant", 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_goes_from_peak_to_zero_after_warmup():
    assert lr_factor(10, 110, "cosine", 10) == 1.0
    assert math.isclose(lr_factor(60, 110, "cosine", 10), 0.5)
    assert lr_factor(110, 110, "cosine", 10) == pytest.approx(0.0, abs=1e-12)


def _lrs_stepped(schedule: str, warmup: int, steps: int) -> tuple[list[float], torch.optim.Optimizer, object]:
    """The lr each of `steps` SGD steps ran at (peak 0.1, 10 steps in all), and the optimizer and schedule."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer("sgd", [param], lr=0.1, momentum=0.0, weight_decay=0.0)
    sched = build_scheduler(opt, total_steps=10, schedule=schedule, warmup_steps=warmup)
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen, opt, sched


def test_scheduler_drives_the_optimizer_lr_per_step():
    seen, _, _ = _lrs_stepped("cosine", 2, 10)
    assert seen[:3] == pytest.approx([0.05, 0.1, 0.1])
    assert seen == sorted(seen[:2]) + sorted(seen[2:], reverse=True)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_each_optimizer_reduces_a_quadratic(name):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    opt = build_optimizer(name, [w], lr=0.05, momentum=0.9 if name == "sgd" else 0.0, weight_decay=0.0)
    start = (w ** 2).sum().item()
    for _ in range(50):
        loss = (w ** 2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert (w ** 2).sum().item() < 0.5 * start


def test_a_constant_lr_is_set_through_warmup_and_then_left_alone():
    seen, opt, sched = _lrs_stepped("constant", 4, 7)
    assert seen == [0.1 * f for f in (0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0)]  # the same floats as base x factor
    opt.param_groups[0]["lr"] = 0.5  # past warmup, step() no longer writes the lr: the optimizer's value stands
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5 and sched.last_epoch == 8


def _accumulators_in_graph(loss: torch.Tensor) -> list:
    """The AccumulateGrad nodes a backward from `loss` would reach."""
    seen, todo, found = set(), [loss.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "AccumulateGrad":
            found.append(node)
        todo += [next_node for next_node, _ in node.next_functions]
    return found


def _marks_survive_a_step(model: torch.nn.Module) -> bool:
    """Marks each AccumulateGrad node of one step's graph, drops the graph, and tells whether the next step's graph
    reaches the marked nodes again (rather than new ones, built afresh)."""
    loss = model(torch.randn(5, 3)).sum()
    for node in _accumulators_in_graph(loss):
        node.metadata["marked"] = True  # stored on the node itself: gone if the node is freed
    loss.backward()
    del loss, node
    again = _accumulators_in_graph(model(torch.randn(5, 3)).sum())
    return all("marked" in node.metadata for node in again)


def test_held_grad_accumulators_are_the_ones_every_step_uses():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert not _marks_survive_a_step(model)  # unheld: each graph builds its own nodes (what train.py avoids)
    model[0].bias.requires_grad_(False)  # a frozen parameter has no accumulator
    held = grad_accumulators(model.parameters())
    assert len(held) == 3 and {type(n).__name__ for n in held} == {"AccumulateGrad"}
    assert _marks_survive_a_step(model) and _marks_survive_a_step(model)
    assert {id(n) for n in _accumulators_in_graph(model(torch.randn(1, 3)).sum())} == {id(n) for n in held}


def test_train_py_keeps_the_same_accumulators_from_step_to_step(tmp_path, monkeypatch):
    """train.py holds them: each training forward after the first finds its weight's node from the step before."""
    import train

    seen = []  # per training forward: whether the weight's AccumulateGrad node carries the mark of an earlier one

    def mark(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if torch.is_grad_enabled():  # the training forwards (validation runs under no_grad)
            node = torch.autograd.graph.get_gradient_edge(module.weight).node
            seen.append("marked" in node.metadata)
            node.metadata["marked"] = True

    def build_model(*args, **kwargs):
        model = build(*args, **kwargs)
        next(m for m in model.modules() if isinstance(m, torch.nn.Linear)).register_forward_hook(mark)
        return model

    build = train.build_model
    monkeypatch.setattr(train, "build_model", build_model)
    code = train.run(["--epochs", "2", "--threads", "1", "--no-tensorboard", "--runs-dir", str(tmp_path / "runs"),
                      "--checkpoints-dir", str(tmp_path / "ck")])
    assert code == 0 and len(seen) == 10  # 2 epochs of 5 steps
    assert seen == [False] + [True] * 9, seen


@pytest.mark.parametrize("name, momentum, weight_decay", [("sgd", 0.9, 1e-3), ("sgd", 0.0, 0.0), ("adam", 0.0, 1e-3),
                                                         ("adamw", 0.0, 1e-2)])
def test_the_multi_tensor_update_ends_at_the_per_tensor_updates_bits(name, momentum, weight_decay):
    """build_optimizer asks for foreach=True on the CPU, for speed only: 200 steps of a small MLP end at the same
    bits as torch's per-tensor loop (foreach=False); the check is sensitive (an lr one part in a million off shows)."""
    def train(foreach: bool, lr: float = 0.01) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        opt = build_optimizer(name, model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        assert opt.defaults["foreach"] is True
        if not foreach:
            for group in opt.param_groups:
                group["foreach"] = False
        x, y = torch.randn(64, 3), torch.randint(0, 4, (64,))
        for _ in range(200):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    per_tensor = train(foreach=False)
    assert all(torch.equal(a, b) for a, b in zip(train(foreach=True), per_tensor, strict=True))
    nudged = train(foreach=True, lr=0.01 * (1 + 1e-6))
    assert not all(torch.equal(a, b) for a, b in zip(nudged, per_tensor, strict=True))
