"""Simulated time: a clock that moves only from one timer to the next.

Everything in a simulation run happens inside a timer callback, in the order
(time, order of scheduling): two runs with the same seed take the same steps.
Nothing here reads the wall clock.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable


class Clock:
    """The simulated time and its queue of pending timers."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._n = 0
        self.fired = 0

    def at(self, when: float, fn: Callable[[], None]) -> None:
        """Call `fn` at simulated time `when` (now, if `when` is past)."""
        self._n += 1
        heapq.heappush(self._heap, (max(when, self.now), self._n, fn))

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        """Call `fn` `delay` simulated seconds from now."""
        self.at(self.now + delay, fn)

    def run_until(self, until: float) -> None:
        """Fire every timer due up to `until`, in order; the clock ends at `until`."""
        heap = self._heap
        while heap and heap[0][0] <= until:
            when, _, fn = heapq.heappop(heap)
            self.now = when
            self.fired += 1
            fn()
        self.now = max(self.now, until)

    def __len__(self) -> int:
        return len(self._heap)
