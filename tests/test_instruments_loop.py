"""The instruments as train.py runs them: each switched on changes no weight, each reports what it should, the
guards fire under their mistake and stay silent on a healthy run, and --lr-find leaves a run's checkpoints alone.
The instruments' own arithmetic is checked against exact computations in test_instruments.py."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data import build_dataset
from models import build_model
from tests.helpers import run_train, world2_run

COMMON = ["--epochs", "6", "--seed", "3", "--batch-size", "16"]
ALL_ON = ["--layer-stats", "--sharpness-every", "10", "--histograms-every", "2"]

world2_run("instruments-off", COMMON)
world2_run("instruments-on", COMMON + ALL_ON + ["--noise-scale", "--noise-scale-every", "1"])
# Logged (and flushed) every 7 steps: the 3-epoch run's last checkpoint, step 30, holds a flush still in flight
# (started at step 28) and two unflushed steps.
NOISE2 = ["--seed", "3", "--batch-size", "8", "--noise-scale", "--noise-scale-every", "1", "--log-every", "7"]
world2_run("noise-straight", NOISE2 + ["--epochs", "6"])
world2_run("noise-first", NOISE2 + ["--epochs", "3"], "noise-split")
world2_run("noise-second", NOISE2 + ["--epochs", "6", "--resume", "auto"], "noise-split")


def _weights(record) -> str:
    return record.summary["replica_checksums"][0]


def _events(run_dir) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def test_instruments_on_change_no_weight_and_log_what_they_measure(tmp_path):
    off = run_train(tmp_path, COMMON, name="off")
    on = run_train(tmp_path, COMMON + ALL_ON, name="on")
    assert off.returncode == on.returncode == 0, on.output
    assert _weights(on) == _weights(off)  # bit for bit: the instruments only read the training state

    steps = on.summary["global_step"]  # 6 epochs x 10 steps
    instruments = on.summary["instruments"]
    assert [s for s, _ in instruments["sharpness"]] == list(range(0, steps, 10))  # before step 1, 11, 21, ...
    assert all(value > 0 for _, value in instruments["sharpness"])
    assert instruments["guards"] == [] and instruments["noise_scale"] is None
    assert off.summary["instruments"] == {"guards": [], "sharpness": None, "noise_scale": None}

    events = _events(on.run_dir)
    scalars, histograms = set(events.Tags()["scalars"]), set(events.Tags()["histograms"])
    for tag in ("per_layer.net.0/weight.grad_norm", "per_layer.net.0/weight.norm",
                "per_layer.net.0/weight.update_ratio", "per_layer.net.1/act.mean", "per_layer.net.1/act.std",
                "per_layer.net.1/dead_fraction", "sharpness/lambda_max", "sharpness/2_over_lr"):
        assert tag in scalars, tag
    logged = [e.step for e in events.Scalars("per_layer.net.0/weight.update_ratio")]
    assert logged == list(range(10, steps + 1, 10))  # every --log-every (10) steps
    assert all(0 < e.value < 1 for e in events.Scalars("per_layer.net.0/weight.update_ratio"))
    assert [e.value for e in events.Scalars("sharpness/2_over_lr")] == [2 / 0.01] * len(instruments["sharpness"])
    assert {"weights/net.0.weight", "grads/net.0.weight"} <= histograms
    assert [e.step for e in events.Histograms("grads/net.0.weight")] == [20, 40, 60]  # after epochs 2, 4, 6
    assert not any(tag.startswith("per_layer") for tag in _events(off.run_dir).Tags()["scalars"])


def test_the_first_sharpness_is_the_exact_top_eigenvalue_of_the_initial_hessian(tmp_path):
    """The wiring, against torch.func.hessian: the first --sharpness-samples training samples, the mean
    cross-entropy, the initial weights, eval mode."""
    args = ["--hidden", "6,6", "--epochs", "1", "--seed", "4", "--sharpness-every", "100", "--sharpness-samples", "50"]
    record = run_train(tmp_path, args)
    assert record.returncode == 0, record.output
    data = build_dataset("moons", 200, 0.2, 0.1, 2, 2, 0, "random")
    torch.manual_seed(4)
    model = build_model("mlp", data.in_dim, data.num_classes, (6, 6)).eval()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()

    def loss(theta: torch.Tensor) -> torch.Tensor:
        chunks = theta.split([s.numel() for s in shapes])
        pieces = {n: t.reshape(s) for n, t, s in zip(names, chunks, shapes, strict=True)}
        logits = torch.func.functional_call(model.double(), pieces, (data.train_x[:50].double(),))
        return F.cross_entropy(logits, data.train_y[:50])

    exact = torch.linalg.eigvalsh(torch.func.hessian(loss)(flat)).max().item()
    measured = record.summary["instruments"]["sharpness"][0]
    assert measured[0] == 0
    assert measured[1] == pytest.approx(exact, rel=1e-3)


def test_noise_scale_at_world1_with_accumulation_changes_no_weight_at_any_cadence(tmp_path):
    """60 steps, logged every 10. The default measures the logged steps; --noise-scale-every 1 every step (other
    numbers, same logging steps); 30 measures steps 30 and 60 only (the flushes between have nothing to log)."""
    args = ["--epochs", "6", "--seed", "3", "--batch-size", "8", "--grad-accum-steps", "2"]
    off = run_train(tmp_path, args, name="off")
    runs = {every: run_train(tmp_path, args + ["--noise-scale"] + (["--noise-scale-every", every] if every else []),
                             name=f"on-{every or 'default'}") for every in (None, "1", "30")}
    logged_at = {}
    for every, on in runs.items():
        assert on.returncode == 0, on.output
        assert _weights(on) == _weights(off)
        noise = on.summary["instruments"]["noise_scale"]
        assert set(noise) == {"b_simple", "g2", "trace_sigma"}
        assert noise["g2"] > 0 and noise["trace_sigma"] > 0
        assert noise["b_simple"] == pytest.approx(noise["trace_sigma"] / noise["g2"])
        logged_at[every] = [e.step for e in _events(on.run_dir).Scalars("noise/g2")]
    assert logged_at == {None: [10, 20, 30, 40, 50, 60], "1": [10, 20, 30, 40, 50, 60], "30": [30, 60]}
    default, every_step = (runs[k].summary["instruments"]["noise_scale"]["g2"] for k in (None, "1"))
    assert default != every_step  # one step measured per flush against ten


def test_noise_scale_resumes_exactly_from_a_mid_interval_checkpoint(tmp_path):
    """Every step measured, flushed every 10: a checkpoint at step 27 holds 7 unflushed steps and the averages so
    far; resumed from it, the run ends with the noise scale of the uninterrupted run, bit for bit."""
    args = ["--epochs", "6", "--seed", "3", "--batch-size", "8", "--grad-accum-steps", "2", "--noise-scale",
            "--noise-scale-every", "1"]
    full = run_train(tmp_path, args + ["--checkpoint-every-steps", "27", "--keep-checkpoints", "10"], name="full")
    assert full.returncode == 0, full.output
    mid = full.ckpt_dir / "step-00000027.pt"
    saved = torch.load(mid, weights_only=True)["instruments"][0]["noise_scale"]
    assert saved["source"] and saved["source"][0][4] == 14  # steps 21-27, 2 micro-batches each, not yet flushed
    resumed = run_train(tmp_path, args + ["--resume", str(mid)], name="resumed")
    assert resumed.returncode == 0, resumed.output
    assert resumed.summary["instruments"]["noise_scale"] == full.summary["instruments"]["noise_scale"]
    assert _weights(resumed) == _weights(full)
    # Not vacuous: a resume that forgot the unflushed sums ends elsewhere.
    blob = torch.load(mid, weights_only=True)
    blob["instruments"][0]["noise_scale"]["source"] = []
    forgetful = tmp_path / "forgetful.pt"
    torch.save(blob, forgetful)
    forgot = run_train(tmp_path, args + ["--resume", str(forgetful)], name="forgot")
    assert forgot.returncode == 0, forgot.output
    assert forgot.summary["instruments"]["noise_scale"] != full.summary["instruments"]["noise_scale"]


@pytest.mark.distributed
def test_world2_noise_scale_resumes_exactly_with_a_flush_in_flight(world2):
    straight, first, second = world2["noise-straight"], world2["noise-first"], world2["noise-second"]
    assert straight.returncode == first.returncode == second.returncode == 0, second.output
    assert "resumed from" in second.stdout
    assert second.summary["instruments"]["noise_scale"] == straight.summary["instruments"]["noise_scale"]
    assert _weights(second) == _weights(straight)


@pytest.mark.distributed
def test_world2_instruments_change_no_weight_and_agree_with_world1_accumulation(tmp_path, world2):
    """DDP's comm hook measures the per-rank gradient (batch 16) against the all-reduced one (32); world 1 with
    two micro-batches of 16 measures the same two batch sizes on the same samples split differently."""
    off, on = world2["instruments-off"], world2["instruments-on"]
    assert on.returncode == off.returncode == 0, on.output
    assert _weights(on) == _weights(off)
    reference = run_train(tmp_path, ["--epochs", "6", "--seed", "3", "--batch-size", "16", "--grad-accum-steps", "2",
                                     "--noise-scale", "--noise-scale-every", "1", "--sharpness-every", "10"])
    w2, w1 = on.summary["instruments"], reference.summary["instruments"]
    assert [s for s, _ in w2["sharpness"]] == [s for s, _ in w1["sharpness"]]
    for (_, a), (_, b) in zip(w2["sharpness"], w1["sharpness"], strict=True):
        assert a == pytest.approx(b, rel=1e-3)  # the same trajectory up to float summation order
    # Different splits of the same samples: the estimates differ by sampling noise only (measured ~7% apart).
    assert 0.7 < w2["noise_scale"]["b_simple"] / w1["noise_scale"]["b_simple"] < 1.4
    assert w2["guards"] == []


@pytest.mark.parametrize("mistake, guard", [
    ("no-train-mode", "eval-mode-training"), ("no-zero-grad", "grad-not-cleared"),
    ("no-set-epoch", "sampler-epoch"), ("no-eval-mode", "train-mode-validation"), ("", None),
])
def test_each_guard_fires_under_its_mistake_once_and_never_on_a_healthy_run(tmp_path, mistake, guard):
    record = run_train(tmp_path, ["--epochs", "3", "--dropout", "0.1"] + (["--break", mistake] if mistake else []))
    messages = record.summary["instruments"]["guards"]
    if guard is None:
        assert messages == [] and "warning: guard" not in record.output
    else:
        assert len(messages) == 1 and messages[0].startswith(f"guard {guard}:")
        assert record.output.count(f"guard {guard}:") == 1  # warned once, on the console too
        assert "Look at the" in messages[0]  # names the line


def test_lr_find_leaves_the_runs_checkpoints_byte_identical(tmp_path):
    trained = run_train(tmp_path, ["--epochs", "3"])
    assert trained.returncode == 0

    def snapshot() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(trained.ckpt_dir.rglob("*"))
                if p.is_file()}

    before = snapshot()
    found = run_train(tmp_path, ["--lr-find", "--lr-find-steps", "60"])
    assert found.returncode == 0, found.output
    assert snapshot() == before and before
    assert (trained.run_dir / "lr_find.png").stat().st_size > 10_000
    result = json.loads((trained.run_dir / "lr_find.json").read_text())
    line = next(ln for ln in found.stdout.splitlines() if ln.startswith("suggested lr: "))
    assert f"{result['suggestion']:.3g}" in line and result["rule"] in line
    assert 1e-6 <= result["suggestion"] <= 10 and len(result["losses"]) <= 60
