"""select_pass(): which held inputs form a continuous worker's next forward pass. Pure; Hypothesis."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.passes import MAX_PASSES_WAITED, densest_pass, oldest_pass, plan_pass, select_pass


def padded(costs, chosen):
    return len(chosen) * max(costs[i] for i in chosen)


def waste(costs, chosen):
    return padded(costs, chosen) - sum(costs[i] for i in chosen)


@settings(max_examples=400, deadline=None)
@given(costs=st.lists(st.integers(0, 512), min_size=1, max_size=200), most=st.integers(1, 64),
       budget=st.sampled_from([0, 64, 512, 2048]))
def test_a_pass_holds_the_oldest_and_keeps_every_bound(costs, most, budget):
    chosen = select_pass(costs, most, budget)
    assert 0 in chosen, "the longest-waiting input always goes"
    assert len(set(chosen)) == len(chosen) and all(0 <= i < len(costs) for i in chosen)
    assert 1 <= len(chosen) <= most
    if budget and len(chosen) > 1:
        assert padded(costs, chosen) <= budget
    assert [costs[i] for i in chosen] == sorted(costs[i] for i in chosen), "in length order, for the model"
    # It is a run of the length order: no held input lies strictly between two chosen ones and is left out.
    low, high = min(costs[i] for i in chosen), max(costs[i] for i in chosen)
    between = [i for i, c in enumerate(costs) if low < c < high]
    assert set(between) <= set(chosen)


@settings(max_examples=200, deadline=None)
@given(costs=st.lists(st.integers(1, 512), min_size=1, max_size=200), most=st.integers(1, 64))
def test_without_a_budget_a_pass_is_as_full_as_it_can_be(costs, most):
    assert len(select_pass(costs, most)) == min(most, len(costs))


@settings(max_examples=200, deadline=None)
@given(costs=st.lists(st.integers(1, 128), min_size=2, max_size=64))
def test_every_input_runs_within_as_many_passes_as_were_ahead_of_it(costs):
    """Serving the oldest first bounds every input's wait: the held inputs drain in order of age."""
    held = list(range(len(costs)))
    passes_until = {}
    rounds = 0
    while held:
        chosen = select_pass([costs[i] for i in held], 4, 0)
        rounds += 1
        for k in chosen:
            passes_until[held[k]] = rounds
        held = [h for k, h in enumerate(held) if k not in set(chosen)]
    for position in range(len(costs)):
        assert passes_until[position] <= position + 1


def test_a_pass_grows_towards_the_nearest_lengths_and_pads_less_than_arrival_order():
    costs = [30, 5, 31, 6, 29, 7, 32, 8]  # arrivals alternate long and short
    chosen = select_pass(costs, 4)
    assert sorted(costs[i] for i in chosen) == [29, 30, 31, 32]
    assert waste(costs, chosen) == 6 < waste(costs, [0, 1, 2, 3]) == 52


def test_an_oldest_input_over_the_budget_goes_alone():
    assert select_pass([5000, 10, 10], 16, 2048) == [0]


@settings(max_examples=300, deadline=None)
@given(costs=st.lists(st.integers(1, 512), min_size=1, max_size=200), most=st.integers(1, 64),
       budget=st.sampled_from([0, 256, 1024, 2048]))
def test_the_densest_run_keeps_every_bound_and_is_a_run_of_the_length_order(costs, most, budget):
    chosen = densest_pass(costs, most, budget)
    assert 1 <= len(chosen) <= most and len(set(chosen)) == len(chosen)
    if budget and len(chosen) > 1:
        assert padded(costs, chosen) <= budget
    low, high = min(costs[i] for i in chosen), max(costs[i] for i in chosen)
    assert {i for i, c in enumerate(costs) if low < c < high} <= set(chosen)
    if not budget:
        assert len(chosen) == min(most, len(costs))


def test_the_densest_run_pads_least_and_prefers_the_older_among_equals():
    costs = [40, 10, 11, 12, 13, 50, 90, 91, 92, 93]
    assert sorted(densest_pass(costs, 4)) == [6, 7, 8, 9]  # 6 padded tokens for 366 of its own: less, relatively
    assert sorted(densest_pass(costs[:6], 4)) == [1, 2, 3, 4]
    assert sorted(densest_pass([7, 7, 7, 7], 2)) == [0, 1]


@settings(max_examples=200, deadline=None)
@given(costs=st.lists(st.integers(1, 128), min_size=2, max_size=64), arrivals=st.lists(st.integers(1, 128), max_size=300))
def test_no_input_waits_more_than_the_bound_plus_the_passes_ahead_of_it(costs, arrivals):
    """With new inputs arriving after every pass, an input is passed over at most MAX_PASSES_WAITED
    times, then at most once for each other input held (each pass takes one that waited at least as long)."""
    held = [[c, 0] for c in costs]
    stream = iter(arrivals)
    worst = 0
    for _ in range(len(costs) + len(arrivals) + 64):
        if not held:
            break
        chosen = set(plan_pass([c for c, _ in held], [w for _, w in held], 4))
        worst = max([worst] + [held[k][1] for k in chosen])
        held = [[c, w + 1] for k, (c, w) in enumerate(held) if k not in chosen]
        held.extend([c, 0] for c in (next(stream, None) for _ in chosen) if c is not None)
    assert worst <= MAX_PASSES_WAITED + len(costs)


@settings(max_examples=300, deadline=None)
@given(held=st.lists(st.tuples(st.integers(1, 512), st.integers(0, MAX_PASSES_WAITED - 1)), min_size=1, max_size=40),
       most=st.integers(1, 16), oldest_below=st.integers(0, 48), least=st.sampled_from([0, 1, 8]))
def test_under_a_light_load_the_oldest_input_anchors_every_pass(held, most, oldest_below, least):
    """Fewer than oldest_below held: the input that waited longest (the oldest among equals) goes
    now, whatever pads least; at or above it, the densest run (no input has waited the bound)."""
    costs, waited = [c for c, _ in held], [w for _, w in held]
    chosen = plan_pass(costs, waited, most, 0, least, oldest_below)
    oldest = waited.index(max(waited))
    if len(held) < oldest_below:
        assert oldest in chosen
        assert chosen == select_pass(costs, min(most, max(least, -(-len(held) // 2))) if least else most,
                                     anchor=oldest)
    else:
        assert chosen == densest_pass(costs, min(most, max(least, -(-len(held) // 2))) if least else most)


@settings(max_examples=400, deadline=None)
@given(costs=st.lists(st.integers(0, 512), min_size=1, max_size=200), most=st.integers(1, 64),
       budget=st.sampled_from([0, 64, 512, 2048]))
def test_a_pass_without_padding_takes_the_oldest_inputs_as_far_as_the_bounds_allow(costs, most, budget):
    chosen = oldest_pass(costs, most, budget)
    count = len(chosen)
    assert chosen == list(range(count)), "the oldest, in arrival order"
    assert 1 <= count <= min(most, len(costs))
    if budget and count > 1:
        assert sum(costs[:count]) <= budget, "the budget is on the sum: nothing is padded"
    if count < min(most, len(costs)):  # stopped early: only the budget can have stopped it
        assert budget and sum(costs[:count + 1]) > budget


@settings(max_examples=200, deadline=None)
@given(held=st.lists(st.tuples(st.integers(1, 512), st.integers(0, 3 * MAX_PASSES_WAITED)), min_size=1, max_size=60),
       most=st.integers(1, 32), least=st.integers(0, 8), oldest_below=st.integers(0, 80))
def test_a_model_that_pads_nothing_gets_its_oldest_inputs_whatever_they_waited(held, most, least, oldest_below):
    costs, waited = [c for c, _ in held], [w for _, w in held]
    chosen = plan_pass(costs, waited, most, 0, least, oldest_below, padded=False)
    expected = min(most, max(least, -(-len(costs) // 2))) if least else most
    assert chosen == list(range(min(expected, len(costs))))
