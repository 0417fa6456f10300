"""The acceptance answers a server keeps in memory (flotilla/network/tickets.py AssignmentTable):
pruned oldest first, stopping at the first one still kept (so a prune costs what it drops, not what
the table holds: at 75 trips/s with a 600 s assignment timeout, plus as much grace, ~90,000)."""

from __future__ import annotations

from flotilla.network.tickets import Answer, AssignmentTable


def test_answers_are_dropped_oldest_first_once_past_keep_until():
    t = AssignmentTable("k" * 16, 2)
    for i, until in enumerate([10.0, 11.0, 30.0, 12.0, 40.0]):
        t.answer(f"a{i}", Answer(i, 0, None, until))
    t.prune_answers(9.0)
    assert list(t.answers) == ["a0", "a1", "a2", "a3", "a4"]
    t.prune_answers(11.5)  # a0, a1 are past: gone; the rest kept
    assert list(t.answers) == ["a2", "a3", "a4"]
    # a3 (until 12) waits behind a2 (until 30): kept a little longer, which answers a retry as the
    # ledger would; it goes with a2
    t.prune_answers(20.0)
    assert list(t.answers) == ["a2", "a3", "a4"] and t.answered("a3").seq == 3
    t.prune_answers(35.0)
    assert list(t.answers) == ["a4"] and t.answered("a2") is None
