"""The per-step bookkeeping against direct computations: the grad norm, the batched predictions, the host reads."""

import math

import torch

from spine.metrics import EpochMeter, GradNorm


def _model_with_grads(dtype=torch.float32) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3)).to(dtype)
    torch.nn.functional.cross_entropy(model(torch.randn(11, 5, dtype=dtype)), torch.randint(0, 3, (11,))).backward()
    return list(model.parameters())


def test_grad_norm_is_get_total_norm_bit_for_bit():
    params = _model_with_grads()
    expected = torch.nn.utils.get_total_norm([p.grad for p in params])
    assert torch.equal(GradNorm(params)(), expected)
    direct = math.sqrt(sum(float(p.grad.double().square().sum()) for p in params))
    assert abs(GradNorm(params)().item() - direct) < 1e-5 * direct


def test_grad_norm_over_several_dtypes_falls_back_to_get_total_norm():
    params = _model_with_grads() + _model_with_grads(torch.float64)
    norm = GradNorm(params)
    assert not norm.one_group
    assert torch.equal(norm(), torch.nn.utils.get_total_norm([p.grad for p in params]))


def _record_steps(meter: EpochMeter, steps: int, generator: torch.Generator) -> list[tuple]:
    recorded = []
    for i in range(steps):
        logits, labels = torch.randn(6, 4, generator=generator), torch.randint(0, 4, (6,), generator=generator)
        loss, norm = torch.rand((), generator=generator), torch.rand((), generator=generator) if i % 3 == 0 else None
        meter.record(loss, logits, labels, norm)
        recorded.append((loss, logits, labels, norm))
    return recorded


def test_batched_predictions_count_what_a_per_step_argmax_counts(monkeypatch):
    monkeypatch.setattr(EpochMeter, "LOGITS_HELD", 24 * 3)  # reduce after every third step: several batches
    meter, generator = EpochMeter(), torch.Generator().manual_seed(1)
    recorded = _record_steps(meter, 10, generator)
    assert len(meter.logits) == 1 and len(meter.predicted) == 3  # bounded: the held logits never pass the limit
    per_step = torch.stack([(logits.argmax(1) == labels).sum() for _, logits, labels, _ in recorded])
    assert torch.equal(meter.correct_per_step(), per_step)


def test_each_value_is_read_to_the_host_once_and_every_reader_sees_it():
    meter, generator = EpochMeter(), torch.Generator().manual_seed(2)
    recorded = _record_steps(meter, 7, generator)
    assert not meter.any_bad(0)
    assert meter._losses_read == [loss.item() for loss, *_ in recorded]  # one transfer read them all
    losses, norms = meter.series(5)
    assert losses == [loss.item() for loss, *_ in recorded[5:]] and norms == [None, recorded[6][3].item()]
    meter.record(torch.tensor(float("nan")), torch.zeros(6, 4), torch.zeros(6, dtype=torch.long), None)
    assert meter.any_bad(7) and not meter.any_bad(8)  # only the new step was read, and it is not finite
    assert len(meter._losses_read) == 8


def test_validation_sums_equal_a_running_total_bit_for_bit_on_every_shard():
    """Validation.sums adds its per-batch sums in batch order: the floats of `totals[i] += v`, batch by batch, on
    each rank's shard of an odd-sized set at world 2, and on the shard --break padded-val pads."""
    import torch.nn.functional as F

    from spine import breaks
    from spine.distributed import DistContext
    from train import Validation

    torch.manual_seed(1)
    x, y = torch.randn(101, 3), torch.randint(0, 4, (101,))
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))

    def running_total(v: Validation) -> torch.Tensor:
        totals = torch.zeros(3, dtype=torch.float64)
        with torch.no_grad():
            for start in range(0, len(v.shard), v.batch_size):
                idx = v.shard[start:start + v.batch_size]
                logits = model(x[idx])
                totals[0] += F.cross_entropy(logits, y[idx], reduction="none").double().sum()
                totals[1] += (logits.argmax(1) == y[idx]).sum()
                totals[2] += len(idx)
        return totals

    for rank in (0, 1):  # no process group: DistributedSampler only needs the rank and the world size
        ctx = DistContext(rank=rank, local_rank=rank, world_size=2, local_world_size=2, device=torch.device("cpu"),
                          backend="gloo", threads=1)
        plain = Validation(x, y, ctx, batch_size=7)
        padded = breaks.padded_validation(breaks.Parts(model, model, None, None, None,
                                                       Validation(x, y, ctx, batch_size=7)), ctx).validation
        for v in (plain, padded):
            assert len(v.shard) > 7  # several batches
            assert torch.equal(v.sums(model), running_total(v))
    assert len(padded.shard) == len(plain.shard) + 1  # rank 1 of 101 samples: one padding index
