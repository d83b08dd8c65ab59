"""NonFiniteGuard on two real gloo ranks: the --log-every check's all-reduce is read at the next check, the epoch's
end or a save, and every rank takes the same decision, naming the same first bad step and rank."""

from __future__ import annotations

import pytest

from tests.helpers import spawn_ranks


def _guarded_steps(rank: int, world: int, scenarios: list[tuple[dict[int, int], list[tuple[str, int]]]]) -> list:
    """Per scenario (nan_at, plan), a fresh guard: each rank records steps with loss 0.5 (NaN at step
    nan_at[rank]; at step -nan_at[rank] only its grad norm is NaN); `plan` is the loop's calls, in order, each
    after recording up to its step: ("check", step), ("save", step), ("epoch", step), ("poison", step: this
    rank's weights become NaN if nan_at names the rank with 0). Returns each call's answer (None for a poison)."""
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
                    norm = torch.tensor(float("nan") if nan_at.get(rank) == -step else 1.0)
                    meter.record(loss, torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), norm)
                if call == "poison":
                    if nan_at.get(rank) == 0:
                        with torch.no_grad():
                            guard.params[0].fill_(float("nan"))
                    answers.append(None)
                elif call == "check":
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
    scenarios = [
        ({1: 3}, [("check", 4), ("check", 8)]),  # steps 1-4 go out at step 4, come back at step 8 (world 1: at 4)
        ({1: 3}, [("check", 4), ("epoch", 6)]),  # read at the epoch's end, before the epoch's own flags
        ({1: 3}, [("check", 4), ("save", 5)]),  # read before a save: no weights written past an unread check
        ({0: 4, 1: 3}, [("check", 4), ("check", 8)]),  # the first bad step over both ranks is the one named
        ({0: -3}, [("check", 4), ("check", 8)]),  # only a gradient: named as one
        # A clean check out, and a NaN after it: the save and the epoch's end check those steps themselves.
        ({1: 5}, [("check", 4), ("save", 6)]),
        ({1: 5}, [("check", 4), ("epoch", 6)]),
        ({0: 0}, [("check", 4), ("poison", 5), ("save", 5)]),  # weights gone bad on one rank: every rank refuses
        ({}, [("check", 4), ("epoch", 5), ("check", 9), ("epoch", 10)]),  # healthy: nothing, epoch after epoch
    ]
    expected = [[None, message], [None, message], [None, message], [None, message],
                [None, "non-finite gradient at step 3 on rank 0"],
                [None, "non-finite loss at step 5 on rank 1"], [None, "non-finite loss at step 5 on rank 1"],
                [None, None, "non-finite parameters at step 5"], [None] * 4]
    assert spawn_ranks(_guarded_steps, 2, scenarios) == [expected] * 2
