"""Continuous batching: which of the inputs a worker holds go into its next forward pass.

Pure: no threads, no clock, no model. worker/loop.py calls take_pass() (plan_pass(), and the
inputs left behind wait one pass more) before every pass.

Every input of a pass is padded to the longest, so a pass should hold inputs of about one
length. The worker holds about two passes' worth (the broker keeps it supplied), and picks
from all of them: the run of inputs, consecutive in length order, that pads least for its own
tokens (densest_pass), up to a number of inputs and a budget of padded tokens. So that no input
waits for ever behind denser runs, an input that has waited MAX_PASSES_WAITED passes anchors
the next one: it goes, with the inputs nearest its length (select_pass).

Measured in process (bench.continuous, MiniLM on 2 CPU cores, 64 inputs held, passes of 16):
always anchoring on the oldest input reached 0.89-0.91x the length-sorted limit; the densest
run with the oldest after 6 passes, 0.97x.

A model that pads nothing (a built-in BERT encoder on a CPU: worker/models/unpadded.py) pays
for tokens, not for the longest input: its passes go oldest first (oldest_pass), within a
budget of tokens, and no input is ever passed over.

A handler that gets a batch whole (the built-in text models, outside continuous batching) runs
it in sorted_passes(): by length, each pass anchored on the shortest input left (select_pass),
within the same budget, padded or, for a model that pads nothing, summed.
The broker forms batches, not passes (broker/batching.py).
"""

from __future__ import annotations

from typing import Sequence


MAX_PASSES_WAITED = 6  # passes an input may be passed over before it anchors one


def plan_pass(costs: Sequence[int], waited: Sequence[int], most_inputs: int, cost_budget: int = 0,
              least_inputs: int = 0, oldest_below: int = 0, max_waited: int = MAX_PASSES_WAITED,
              padded: bool = True) -> list[int]:
    """The next pass: the densest run, unless an input has waited max_waited passes, or fewer than
    oldest_below inputs are held (a light load: latency first); then the one that has waited
    longest, the oldest among equals, anchors it. costs and waited are per held input, oldest first.

    least_inputs > 0: a pass takes at most half of what is held, but at least least_inputs (as a
    CPU text model runs a small batch: two sorted halves pad less than one pass).
    padded False: the model pays for the sum of costs, not for the largest: oldest_pass()."""
    if not costs:
        return []
    light = len(costs) < oldest_below
    most_inputs = pass_size(len(costs), most_inputs, least_inputs)
    if not padded:
        return oldest_pass(costs, most_inputs, cost_budget)
    longest_wait = max(waited)
    if light or longest_wait >= max_waited:
        return select_pass(costs, most_inputs, cost_budget, anchor=waited.index(longest_wait))
    return densest_pass(costs, most_inputs, cost_budget)


def pass_size(held: int, most_inputs: int, least_inputs: int = 0) -> int:
    """The most inputs of a pass formed from `held` inputs: most_inputs; or, with least_inputs > 0,
    at most half of what is held (rounded up), but at least least_inputs."""
    if not least_inputs:
        return most_inputs
    return min(most_inputs, max(least_inputs, -(-held // 2)))


def sorted_passes(costs: Sequence[int], most_inputs: int, cost_budget: int = 0,
                  least_inputs: int = 0, padded: bool = True) -> list[list[int]]:
    """A whole batch cut into passes: every input in exactly one, in ascending cost order (the
    oldest first among equals). Each pass is select_pass() anchored on the cheapest input left:
    the next ones in cost order, up to pass_size() inputs (of the whole batch) and cost_budget
    padded (inputs × the largest cost; 0 for no budget). Positions into costs.
    padded False: the budget is on the sum of a pass's costs, as oldest_pass() takes it."""
    most_inputs = max(1, pass_size(len(costs), most_inputs, least_inputs))
    order = sorted(range(len(costs)), key=lambda k: (costs[k], k))
    passes = []
    start = 0
    while start < len(order):
        # Anchored on the cheapest, a pass grows only to longer inputs, so it is a run of the
        # order from `start` that select_pass() (or, unpadded, oldest_pass()) finds among the
        # next most_inputs.
        window = order[start:start + most_inputs]
        window_costs = [costs[k] for k in window]
        chosen = (select_pass(window_costs, most_inputs, cost_budget, anchor=0) if padded
                  else oldest_pass(window_costs, most_inputs, cost_budget))
        passes.append([window[i] for i in chosen])
        start += len(chosen)
    return passes


def lane_bounds(most_inputs: int, least_inputs: int, lanes: int) -> tuple[int, int]:
    """plan_pass()'s (least_inputs, oldest_below) for a worker with `lanes` compute lanes. With
    several, a pass takes at most half of what is held, down to one input, so that the rest
    starts beside it; and while no more than a pass per lane is held, the oldest input anchors
    every pass. With one, the handler's least_inputs, and the densest run always."""
    return (1, most_inputs * lanes + 1) if lanes > 1 else (least_inputs, 0)


def oldest_pass(costs: Sequence[int], most_inputs: int, cost_budget: int = 0) -> list[int]:
    """The oldest inputs, in arrival order, up to most_inputs and a budget on the sum of their
    costs (0: none). The oldest goes even alone over the budget: it must run some time. For a
    model that pads nothing, where the order of a pass's inputs costs nothing."""
    chosen, total = [], 0
    for position, cost in enumerate(costs[:most_inputs]):
        if chosen and cost_budget and total + cost > cost_budget:
            break
        chosen.append(position)
        total += cost
    return chosen


def densest_pass(costs: Sequence[int], most_inputs: int, cost_budget: int = 0) -> list[int]:
    """Positions of the run of inputs, consecutive in length order, that pads least for its own
    tokens, among the runs of most_inputs (fewer only where the budget or the inputs held force
    it). Ties go to the run with the oldest input. In length order, as select_pass."""
    if not costs:
        return []
    order = sorted(range(len(costs)), key=lambda i: (costs[i], i))
    lengths = [costs[i] for i in order]
    prefix = [0]
    for length in lengths:
        prefix.append(prefix[-1] + length)
    size = min(most_inputs, len(order))
    best, best_key = (0, 1), None
    for start in range(len(order) - size + 1):
        end = start + size
        while cost_budget and end - start > 1 and (end - start) * lengths[end - 1] > cost_budget:
            end -= 1
        useful = prefix[end] - prefix[start]
        waste = (end - start) * lengths[end - 1] - useful
        key = (waste / max(useful, 1), -(end - start), min(order[start:end]))
        if best_key is None or key < best_key:
            best, best_key = (start, end), key
    return order[best[0]:best[1]]


def select_pass(costs: Sequence[int], most_inputs: int, cost_budget: int = 0, anchor: int = 0) -> list[int]:
    """Positions (into costs, which is in arrival order) of the next pass, `anchor` always in it.

    costs: the padded-length cost of each held input (tokens, for a text model), oldest first.
    most_inputs: at most this many inputs in one pass (>= 1).
    cost_budget: at most this much padded cost (inputs × the longest); 0 for no budget. The
        oldest input goes even alone over the budget: it must run some time.
    Returns positions in ascending cost order, which is how a text model wants them.
    """
    if not costs:
        return []
    order = sorted(range(len(costs)), key=lambda i: (costs[i], i))
    low = high = order.index(anchor)  # the window [low, high] of `order`, around the anchor
    longest = costs[anchor]
    count = 1
    while count < most_inputs:
        shorter = order[low - 1] if low > 0 else None
        longer = order[high + 1] if high + 1 < len(order) else None
        # What each candidate adds in padding: a shorter input is padded up to the longest; a
        # longer one pads every input already in.
        shorter_waste = longest - costs[shorter] if shorter is not None else None
        longer_waste = count * (costs[longer] - longest) if longer is not None else None
        fits_shorter = shorter is not None and (not cost_budget or (count + 1) * longest <= cost_budget)
        fits_longer = longer is not None and (not cost_budget or (count + 1) * costs[longer] <= cost_budget)
        if fits_shorter and (not fits_longer or shorter_waste <= longer_waste):
            low -= 1
        elif fits_longer:
            high += 1
            longest = costs[longer]
        else:
            break
        count += 1
    return order[low:high + 1]


def may_start(lane: int, busy_lanes) -> bool:
    """Lane 0 starts a pass whenever it is free; another lane only while lane 0 is busy."""
    return lane == 0 or 0 in busy_lanes


def take_pass(held: list, limits: tuple[int, int, int, int], padded: bool) -> list:
    """The next pass, taken out of `held` (oldest first; each with .cost and .waited): plan_pass()
    chooses within limits (most_inputs, cost_budget, least_inputs, oldest_below), and each input
    left behind has waited one pass more."""
    chosen = plan_pass([h.cost for h in held], [h.waited for h in held], *limits, padded=padded)
    running = [held[k] for k in chosen]
    for k in sorted(chosen, reverse=True):
        del held[k]
    for waiting in held:
        waiting.waited += 1
    return running


def current_inputs(held: list, epochs: dict[int, int]) -> list:
    """What is held less the inputs of batches a broker has forgotten since (ComputeState.link_epochs)."""
    return [h for h in held if h.batch.epoch == epochs.get(h.batch.link, h.batch.epoch)]
