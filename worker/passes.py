"""Continuous batching: which of the inputs a worker holds go into its next forward pass.

Pure: no threads, no clock, no model. worker/loop.py calls select_pass() before every pass.

A pass always takes the input that has waited longest (so none waits for more than the passes
ahead of it), then grows around it in length order: every input of a pass is padded to the
longest, so the inputs that join are those whose cost is nearest its own, up to a number of
inputs and a budget of padded cost (inputs × the longest). The worker holds about two passes'
worth from the broker, so a pass is picked from a window that is as wide as a length-sorted
batch, and the model never waits for a cohort of clients to come back.
"""

from __future__ import annotations

from typing import Sequence


def select_pass(costs: Sequence[int], most_inputs: int, cost_budget: int = 0) -> list[int]:
    """Positions (into costs, which is in arrival order) of the next pass, the first always in it.

    costs: the padded-length cost of each held input (tokens, for a text model), oldest first.
    most_inputs: at most this many inputs in one pass (>= 1).
    cost_budget: at most this much padded cost (inputs × the longest); 0 for no budget. The
        oldest input goes even alone over the budget: it must run some time.
    Returns positions in ascending cost order, which is how a text model wants them.
    """
    if not costs:
        return []
    order = sorted(range(len(costs)), key=lambda i: (costs[i], i))
    low = high = order.index(0)  # the window [low, high] of `order`, around the oldest input
    longest = costs[0]
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
