"""Per-model figures the broker keeps for STATUS and for Retry-After. Pure: times come in as `now`."""

from __future__ import annotations

from collections import Counter, deque

_RATE_WINDOW_S = 10.0  # window over which a model's drain rate is measured (for Retry-After)


class ModelStats:
    """Per-model figures for status and for Retry-After."""

    def __init__(self) -> None:
        self.batches = 0
        self.items = 0
        self.batch_sizes: Counter[int] = Counter()
        self.outcomes: Counter[str] = Counter()  # "ok" or an ErrorCode value
        self.redispatched = 0
        self._completions: deque[tuple[float, int]] = deque()  # (at, items) within the window

    def record_dispatch(self, size: int) -> None:
        self.batches += 1
        self.items += size
        self.batch_sizes[size] += 1

    def record_completion(self, size: int, now: float) -> None:
        self._completions.append((now, size))
        while self._completions and self._completions[0][0] < now - _RATE_WINDOW_S:
            self._completions.popleft()

    def items_per_s(self, now: float) -> float:
        recent = [n for at, n in self._completions if at >= now - _RATE_WINDOW_S]
        return sum(recent) / _RATE_WINDOW_S

    def describe(self) -> dict:
        return {
            "batches": self.batches,
            "items": self.items,
            "mean_batch_size": round(self.items / self.batches, 3) if self.batches else 0.0,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "outcomes": dict(self.outcomes),
            "redispatched": self.redispatched,
        }
