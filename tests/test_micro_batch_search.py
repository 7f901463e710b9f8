"""The "auto" micro-batch search (pipeshard.search_micro_batches) on synthetic step-time curves:
`plan_at(k)` returns (plan, step time) or raises NoPlanFits, as the planner does per count."""
import math

import pytest

from meshweave.pipeshard import NO_TRACE, NoPlanFits, search_micro_batches

POWERS = tuple(2 ** e for e in range(11))                       # divisors of a batch of 1024
DIVISORS_1520 = tuple(k for k in range(1, 1521) if 1520 % k == 0)


def curve(times: dict, no_trace_from: float = math.inf):
    """plan_at for a table of step times: counts not in it have no plan that fits memory; counts
    from `no_trace_from` on do not trace."""
    planned = []

    def plan_at(k):
        planned.append(k)
        if k >= no_trace_from:
            raise NoPlanFits(f"{NO_TRACE} {k} micro-batches: cannot reshape")
        if k not in times:
            raise NoPlanFits(f"no pipeline plan fits memory_capacity at {k} micro-batches")
        return f"plan@{k}", times[k]

    return plan_at, planned


def test_a_step_down_past_the_first_local_optimum_is_found():
    """MoE-2.4B on 8 p3 GPUs as mw.plan priced it per count: rematerialized at 16-64 micro-batches
    (a local optimum at 16), not at 128, where the step is 22% faster; 8 does not fit and 1024
    does not trace. A walk from the middle stopped at 16."""
    times = {16: 11.405, 32: 11.443, 64: 11.467, 128: 8.906, 256: 9.312, 512: 9.957}
    plan_at, planned = curve(times, no_trace_from=1024)
    k, plan, tries = search_micro_batches(POWERS, plan_at, walk=True)
    assert (k, plan) == (128, "plan@128")
    assert len(planned) == len(set(planned)) == 8                # each count once; 1, 2, 4 not planned
    assert {t.micro_batches for t in tries if t.step_time is None} == {8, 1024}


def test_the_best_count_between_ladder_rungs_is_reached_by_the_walk():
    """A batch of 1520: nothing fits below 38 micro-batches, a local optimum at 76, a step down at
    304 (no more rematerialization), and 304 is not a rung of the ladder (40, 80, 190, 380, 760, 1520)."""
    times = {38: 12.0, 40: 11.8, 76: 11.0, 80: 11.1, 95: 11.3, 152: 11.6, 190: 11.8, 304: 9.0, 380: 9.2,
             760: 9.8, 1520: 11.0}
    plan_at, planned = curve(times)
    k, _, tries = search_micro_batches(DIVISORS_1520, plan_at, walk=True)
    assert k == 304
    assert len(planned) <= 10 < len(DIVISORS_1520)               # a ladder and a walk, not every divisor


@pytest.mark.parametrize("best", [1, 8, 38, 1520])
def test_a_unimodal_curve_finds_its_minimum(best):
    times = {k: 1.0 + abs(math.log(k / best)) for k in DIVISORS_1520}
    plan_at, planned = curve(times)
    k, _, _ = search_micro_batches(DIVISORS_1520, plan_at, walk=True)
    assert k == best and len(planned) <= math.log2(1520) + 3    # the ladder's rungs, a few walk steps


def test_fewest_fitting_count_is_bisected_not_walked():
    """Nothing fits below 256 of 1024 counts: the counts below the middle are not planned."""
    times = {256: 3.0, 512: 2.0, 1024: 2.5}
    plan_at, planned = curve(times)
    k, _, _ = search_micro_batches(POWERS, plan_at, walk=True)
    assert k == 512 and min(planned) == 32 and len(planned) <= 6


def test_a_step_that_traces_at_no_count_says_so():
    plan_at, _ = curve({}, no_trace_from=1)
    with pytest.raises(NoPlanFits) as e:
        search_micro_batches(POWERS, plan_at, walk=True)
    msg = str(e.value)
    assert msg.startswith("the step does not trace at any micro-batch count tried")
    assert "cannot reshape" in msg and "Fix the step" in msg and "has a plan that fits" not in msg


def test_no_fit_names_the_counts_that_did_not_trace():
    plan_at, _ = curve({}, no_trace_from=512)
    with pytest.raises(NoPlanFits) as e:
        search_micro_batches(POWERS, plan_at, walk=True)
    msg = str(e.value)
    assert "has a plan that fits" in msg and "does not trace at [512]" in msg
    assert msg.endswith("no pipeline plan fits memory_capacity at 256 micro-batches")
