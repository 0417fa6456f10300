"""Which devices train: the sync round's cohort draw and the async hand-out of free slots.

Sync: during ``selection_window_s`` after a round opens, check-ins are only collected
(:attr:`Selection.candidates`); then the round's devices are drawn uniformly from them (as the
simulator samples its cohort), not first come first served, which would favour the devices that
just finished the previous round.  Later check-ins fill any free slots.  A device whose update
was refused as unacceptable (``never``) sits out the rest of the round (:attr:`excluded`): it
would retrain to the same refused delta.

Async: a device that just uploaded (or was refused) waits ``retry_after_s`` before its next
assignment (:attr:`cooldown`), so the slot it freed goes to whichever waiting device checks in
first rather than straight back to itself.
"""

from __future__ import annotations

import numpy as np


def draw_cohort(pool: list[str], free: int, seed: int, version: int) -> list[str]:
    """``min(free, len(pool))`` devices of the sorted ``pool``, uniformly, reproducibly per round."""
    if free <= 0 or not pool:
        return []
    rng = np.random.default_rng([seed, version, 0x5E1EC7])
    return [pool[i] for i in sorted(rng.choice(len(pool), size=min(free, len(pool)), replace=False).tolist())]


class Selection:
    def __init__(self, seed: int):
        self.seed = seed
        self.candidates: set[str] = set()  # sync: devices that checked in during the window
        self.selected_round = -1  # sync: the round whose cohort has been drawn
        self.excluded: set[str] = set()  # sync: devices refused for good this round
        self.cooldown: dict[str, float] = {}  # async: device -> when it may take work again

    def new_round(self) -> None:
        self.excluded = set()

    def redraw(self) -> None:
        """The round starts over (a secure round aborted): draw again."""
        self.selected_round = -1

    def rest(self, device: str, until: float) -> None:
        self.cooldown[device] = until

    def resting(self, device: str, now: float) -> float:
        return self.cooldown.get(device, 0.0) - now

    def prune(self, now: float) -> None:
        self.cooldown = {d: t for d, t in self.cooldown.items() if t > now}

    def draw(self, version: int, taken: set[str], free: int) -> list[str]:
        """Sync: the round's cohort from this window's candidates (``taken``: already working or done)."""
        self.selected_round = version
        pool = sorted(self.candidates - taken - self.excluded)
        self.candidates = set()
        return draw_cohort(pool, free, self.seed, version)
