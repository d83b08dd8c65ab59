"""NonFiniteGuard on two real gloo ranks: the --log-every check's all-reduce is read at the next check, the epoch's
end or a save, and every rank takes the same decision, naming the same first bad step and rank."""

from __future__ import annotations

import pytest

from tests.helpers import spawn_ranks


def _guarded_steps(rank: int, world: int, scenarios: list[tuple[dict[int, int], list[tuple[str, int]]]]) -> list:
    """Per scenario (nan_at, plan), a fresh guard: each rank records steps with loss 0.5 (NaN at step
    nan_at[rank]); `plan` is the loop's calls, in order, each after recording up to its step: ("check", step),
    ("save", step), ("epoch", step). Returns each call's answer, per scenario."""
    import torch

    from spine.distributed import distributed_session
    from spine.guard import NonFiniteGuard
    from spine.metrics import EpochMeter

    results = []
    with distributed_session("cpu", 1, 30.0) as ctx:
        for nan_at, plan in scenarios:
            meter, answers, step = EpochMeter(), [], 0
            guard = NonFiniteGuard(ctx, list(torch.nn.Linear(2, 2).parameters()), meter)
            for call, until in plan:
                while step < until:
                    step += 1
                    loss = torch.tensor(float("nan") if nan_at.get(rank) == step else 0.5)
                    meter.record(loss, torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), torch.tensor(1.0))
                if call == "check":
                    answers.append(guard.check_steps(step))
                elif call == "save":
                    answers.append(guard.check_before_save(step))
                else:
                    totals = meter.end_of_epoch(ctx, guard.checked, "0" * 16, False)
                    answers.append(guard.end_of_epoch(totals.bad, step))
                    meter.clear()
            results.append(answers)
    return results


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_a_check_is_answered_at_the_next_check_the_epoch_end_or_a_save_on_every_rank_alike():
    message = "non-finite loss at step 3 on rank 1"
    by_check = [("check", 4), ("check", 8), ("check", 12)]
    scenarios = [
        ({1: 3}, by_check),  # steps 1-4 go out at step 4 and come back at step 8 (at world 1: at step 4)
        ({1: 3}, [("check", 4), ("epoch", 6)]),  # read at the epoch's end, before the epoch's own flags
        ({1: 3}, [("check", 4), ("save", 5)]),  # read before a save: no weights written past an unread check
        ({0: 4, 1: 3}, by_check),  # the first bad step over both ranks is the one named
        ({}, [("check", 4), ("epoch", 5), ("check", 9), ("epoch", 10)]),  # healthy: nothing, epoch after epoch
    ]
    expected = [[None, message, None], [None, message], [None, message], [None, message, None], [None] * 4]
    assert spawn_ranks(_guarded_steps, 2, scenarios) == [expected] * 2
