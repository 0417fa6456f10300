"""The simulated clock: an event-driven priority queue of trip ends.

Two schedulers share one candidate stream.  Candidate ``k`` (a counter) is a device drawn
uniformly from the population together with the outcome its trip would have if started now
(duration, dropout time), all derived from hashes of ``(seed, k)`` and computed in
vectorised batches.  A candidate is taken if its device is idle and eligible at the current
simulated time, otherwise skipped; the trip id of a started trip is its ``k``.  Everything is
therefore a deterministic function of the seed: the same seed gives the same event trace,
and a scheduler can be checkpointed as a handful of counters plus the trips in flight.

* :class:`AsyncScheduler` keeps ``concurrency`` trips in flight: the caller pops the next trip
  end (a completion or a dropout) and calls :meth:`~AsyncScheduler.fill` to start new trips
  from the currently eligible devices.  With ``arrival_rate``, trips instead start at the events
  of a Poisson process of that rate (devices checking in on their own, as FLSim's async
  simulation has them), up to ``concurrency`` in flight; an arrival that finds the cap reached
  or no eligible device is lost (``arrivals_missed``).
* :class:`SyncScheduler` runs synchronous rounds: over-selects a cohort at the round start and
  closes the round at the ``cohort``-th completion or at the deadline; results arriving after
  the close are discarded (wasted work), and their devices stay busy until they finish.

Memory is O(trips in flight + batch), independent of the population size.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

from flotilla.fleet.fleet import Fleet
from flotilla.fleet.population import STREAM_ARRIVAL, stream_key, uniform_scalar

INF = math.inf
DAY_S = 86400.0
STALL_DAYS = 30.0  # no device became eligible for this long (simulated): give up


class FleetStalled(RuntimeError):
    """The simulation cannot make progress (no client can ever finish); the message says why."""


class _Scheduler:
    def __init__(self, fleet: Fleet, *, trace: bool = False, batch: int = 4096):
        self.fleet = fleet
        self.av = fleet.availability
        self.size = fleet.size
        self.batch = batch
        self.now = 0.0
        self.busy: set[int] = set()
        self.trips_started = 0
        self.trace: list[tuple] | None = [] if trace else None
        self._k0 = 0  # candidate counter of the current batch's first entry
        self._i = 0  # next unread entry of the current batch
        self._n = 0  # entries in the current batch
        self._elig_hour: int | None = None
        self._last_start = 0.0

    # -- the candidate stream ---------------------------------------------------------------
    @property
    def next_candidate(self) -> int:
        return self._k0 + self._i

    def _seek(self, k: int) -> None:
        self._k0, self._i, self._n = k, 0, 0

    def _refill(self) -> None:
        k0 = self._k0 + self._i
        n = self.batch
        self._k0, self._i, self._n = k0, 0, n
        self._k_np = np.arange(k0, k0 + n, dtype=np.uint64)
        self._dev_np = self.fleet.population.candidates(self._k_np)
        self._dev = self._dev_np.tolist()
        self._elig_hour = None
        if self.av.always:
            b = self.fleet.durations.trips_for(self._k_np, self._dev_np)
            self._cli, self._dur, self._drop = b.client.tolist(), b.duration.tolist(), b.drop_at.tolist()
        else:
            # Trip outcomes are computed only for candidates that are eligible when visited.
            self._have = np.zeros(n, dtype=bool)
            self._cli_np, self._dur_np, self._drop_np = np.zeros(n, dtype=np.int64), np.zeros(n), np.zeros(n)

    def _outcomes(self, positions: np.ndarray) -> None:
        new = positions[~self._have[positions]]
        if len(new) == 0:
            return
        b = self.fleet.durations.trips_for(self._k_np[new], self._dev_np[new])
        self._cli_np[new], self._dur_np[new], self._drop_np[new] = b.client, b.duration, b.drop_at
        self._have[new] = True
        self._cli, self._dur, self._drop = self._cli_np.tolist(), self._dur_np.tolist(), self._drop_np.tolist()

    def _eligible_index(self) -> int | None:
        """Consume candidates until one is idle and eligible now; its batch index, or None.

        Rejection sampling: the number of tries is sized so that missing an eligible device
        when the fraction eligible-and-idle is ``f`` has probability ``exp(-40)``.  With a
        diurnal curve, eligibility is computed for the whole batch at once (vectorised) each
        simulated hour, and only the eligible positions are visited.
        """
        av = self.av
        always = av.always
        hour = int(self.now // 3600.0)
        frac = 1.0 if always else av.fraction_by_hour[hour % 24]
        free = self.size - len(self.busy)
        if frac <= 0.0 or free <= 0:
            return None
        limit = min(int(40.0 / (frac * free / self.size)) + 1, 10_000_000)
        busy = self.busy
        if always:
            for _ in range(limit):
                if self._i >= self._n:
                    self._refill()
                i = self._i
                self._i = i + 1
                if self._dev[i] not in busy:
                    return i
            return None
        tries = 0
        while tries < limit:
            if self._i >= self._n:
                self._refill()
            if self._elig_hour != hour:
                mask = av.eligible(self._dev_np[self._i :], self.now)
                pos = np.flatnonzero(mask) + self._i
                self._outcomes(pos)
                self._pos = pos.tolist()
                self._p = 0
                self._elig_hour = hour
            if self._p >= len(self._pos):  # no eligible candidate left in this batch
                tries += self._n - self._i
                self._i = self._n
                continue
            i = self._pos[self._p]
            self._p += 1
            tries += i - self._i + 1
            self._i = i + 1
            if self._dev[i] not in busy:
                return i
        return None

    def _stall_check(self) -> None:
        if self.now - self._last_start > STALL_DAYS * DAY_S and not self.busy:
            raise FleetStalled(
                f"fleet simulation stalled: no device became eligible for {STALL_DAYS:.0f} simulated days "
                f"(simulated time {self.now:.0f} s); check fleet.availability.diurnal and fleet.population"
            )


@dataclass
class PoissonArrivals:
    """Devices checking in as a Poisson process of ``rate`` per simulated second: the gap after
    arrival ``count`` is exponential, from the hash of ``(key, count)`` (so it checkpoints as counters)."""

    rate: float
    key: int
    count: int = 0  # arrivals so far
    missed: int = 0  # arrivals that found `concurrency` trips in flight or no eligible device
    pending: bool = False  # the next arrival is in the event heap

    def gap(self) -> float:
        return -math.log(uniform_scalar(self.key, self.count)) / self.rate

    def state(self) -> np.ndarray:
        return np.array([self.count, self.missed, int(self.pending)], dtype=np.int64)

    def load(self, a: np.ndarray) -> None:
        self.count, self.missed, pending = (int(x) for x in a)
        self.pending = bool(pending)


class AsyncScheduler(_Scheduler):
    """Keeps ``concurrency`` trips in flight (with ``arrival_rate``: at most that many, started at
    the arrivals of :class:`PoissonArrivals`).

    Events in the heap are tuples ``(t_end, seq, trip_id, device, client, version, t_start,
    dropped)``; ``trip_id = -1`` marks a wake-up (retry starting trips when no device was
    eligible), ``trip_id = -2`` the next arrival.  ``version`` is whatever the caller set in
    :attr:`version` when the trip started (the model version the client downloaded); :attr:`refs`
    counts trips in flight per version.
    """

    def __init__(self, fleet: Fleet, concurrency: int, *, arrival_rate: float | None = None, **kw):
        if concurrency < 1:
            raise ValueError(f"async.concurrency: must be >= 1, got {concurrency}")
        if arrival_rate is not None and not (math.isfinite(arrival_rate) and arrival_rate > 0):
            raise ValueError(
                f"async.arrival_rate: must be a positive number of arrivals per simulated second, got {arrival_rate}"
            )
        if concurrency > fleet.size:
            raise ValueError(f"async.concurrency: {concurrency} is larger than fleet.population={fleet.size}")
        super().__init__(fleet, **kw)
        self.concurrency = concurrency
        self.heap: list[tuple] = []
        self.seq = 0
        self.version = 0
        self.refs: dict[int, int] = {}
        self.area = 0.0  # integral of (trips in flight) d(simulated time)
        self.wake_pending = False
        # one attribute for the arrival process: the fixed-concurrency hot loop stays as it was
        self.poisson = (
            None
            if arrival_rate is None
            else PoissonArrivals(arrival_rate, stream_key(fleet.population.seed, STREAM_ARRIVAL))
        )
        if arrival_rate is not None:
            self.fill = self._fill_arrivals

    @property
    def in_flight(self) -> int:
        return len(self.busy)

    def fill(self) -> int:
        """Start trips until ``concurrency`` are in flight or no device is eligible; return how many."""
        started = 0
        while len(self.busy) < self.concurrency:
            i = self._eligible_index()
            if i is None:
                if not self.wake_pending:
                    heapq.heappush(self.heap, (self.av.next_open(self.now), self.seq, -1, -1, -1, -1, self.now, False))
                    self.seq += 1
                    self.wake_pending = True
                break
            self._start(i)
            started += 1
        return started

    def _fill_arrivals(self) -> int:
        """``fill`` with ``arrival_rate``: trips start only at arrivals; make sure the next one is due."""
        if not self.poisson.pending:
            self._schedule_arrival()
        return 0

    def _schedule_arrival(self) -> None:
        p = self.poisson
        heapq.heappush(self.heap, (self.now + p.gap(), self.seq, -2, -1, -1, -1, self.now, False))
        self.seq += 1
        p.pending = True

    def _arrive(self) -> None:
        """One Poisson arrival: a trip starts if the cap allows and an eligible device is idle."""
        p = self.poisson
        p.pending = False
        p.count += 1
        i = self._eligible_index() if len(self.busy) < self.concurrency else None
        if i is None:
            p.missed += 1
            self._stall_check()
        else:
            self._start(i)
        self._schedule_arrival()

    def _start(self, i: int) -> None:
        now, v = self.now, self.version
        tid, d, drop = self._k0 + i, self._dev[i], self._drop[i]
        dropped = drop != INF
        heapq.heappush(
            self.heap, (now + (drop if dropped else self._dur[i]), self.seq, tid, d, self._cli[i], v, now, dropped)
        )
        self.seq += 1
        self.busy.add(d)
        self.refs[v] = self.refs.get(v, 0) + 1
        self.trips_started += 1
        self._last_start = now
        if self.trace is not None:
            self.trace.append((now, "start", tid, d, v))

    def pop(self) -> tuple:
        """Advance the clock to the next trip end and return its event tuple."""
        heap = self.heap
        while True:
            if not heap:
                self.fill()
                if not heap:
                    raise FleetStalled("fleet simulation stalled: nothing in flight and no device can be started")
            ev = heapq.heappop(heap)
            t = ev[0]
            self.area += len(self.busy) * (t - self.now)
            self.now = t
            if ev[2] < 0:
                if ev[2] == -2:  # a Poisson arrival
                    self._arrive()
                    continue
                # wake-up
                self.wake_pending = False
                self._stall_check()
                self.fill()
                continue
            self.busy.discard(ev[3])
            v = ev[5]
            r = self.refs[v] - 1
            if r:
                self.refs[v] = r
            else:
                del self.refs[v]
            if self.trace is not None:
                self.trace.append((t, "drop" if ev[7] else "done", ev[2], ev[3], v))
            return ev

    # -- checkpointing ----------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        h = self.heap
        return {
            "ev_t": np.array([e[0] for e in h], dtype=np.float64),
            "ev_ints": np.array([[e[1], e[2], e[3], e[4], e[5]] for e in h], dtype=np.int64).reshape(-1, 5),
            "ev_t_start": np.array([e[6] for e in h], dtype=np.float64),
            "ev_dropped": np.array([e[7] for e in h], dtype=np.int64),
            "scalars_f": np.array([self.now, self.area, self._last_start], dtype=np.float64),
            "scalars_i": np.array(
                [self.next_candidate, self.seq, self.version, self.trips_started, int(self.wake_pending)],
                dtype=np.int64,
            ),
            **({} if self.poisson is None else {"arrivals": self.poisson.state()}),
        }

    def load_state_arrays(self, s: dict[str, np.ndarray]) -> None:
        self.heap = [
            (float(t), int(q), int(tid), int(d), int(c), int(v), float(ts), bool(dr))
            for t, (q, tid, d, c, v), ts, dr in zip(s["ev_t"], s["ev_ints"], s["ev_t_start"], s["ev_dropped"])
        ]
        heapq.heapify(self.heap)
        self.now, self.area, self._last_start = (float(x) for x in s["scalars_f"])
        k, self.seq, self.version, self.trips_started, wake = (int(x) for x in s["scalars_i"])
        self.wake_pending = bool(wake)
        if self.poisson is not None and "arrivals" in s:
            self.poisson.load(s["arrivals"])
        self._seek(k)
        self.busy = {e[3] for e in self.heap if e[2] >= 0}
        self.refs = {}
        for e in self.heap:
            if e[2] >= 0:
                self.refs[e[5]] = self.refs.get(e[5], 0) + 1


@dataclass
class RoundOutcome:
    """One synchronous round in simulated time."""

    t_start: float
    t_close: float
    selected: int
    accepted: list[tuple[int, int, int]] = field(default_factory=list)  # (trip_id, device, client), by arrival
    late: list[int] = field(default_factory=list)  # trip ids whose results arrived after the close
    dropped: list[int] = field(default_factory=list)  # trip ids that dropped out
    wasted_device_s: float = 0.0  # device time spent on late or dropped trips
    busy_device_s: float = 0.0  # device time inside [t_start, t_close]


class SyncScheduler(_Scheduler):
    """Synchronous rounds: over-selection, first-``cohort`` arrivals, optional deadline."""

    def __init__(self, fleet: Fleet, **kw):
        super().__init__(fleet, **kw)
        self.late: list[tuple[float, int]] = []  # (time the device is free again, device)

    def _release(self) -> None:
        late = self.late
        while late and late[0][0] <= self.now:
            self.busy.discard(heapq.heappop(late)[1])

    def round(self, select: int, cohort: int, deadline_s: float | None = None) -> RoundOutcome:
        if not 1 <= cohort <= select:
            raise ValueError(f"cohort {cohort} must be between 1 and the number selected ({select})")
        if select > self.size:
            raise ValueError(f"cohort x fleet.over_selection = {select} is larger than fleet.population={self.size}")
        self._release()
        chosen: list[tuple] = []
        while True:
            while len(chosen) < select:
                i = self._eligible_index()
                if i is None:
                    break
                # Copy the values out: a refill may replace the batch lists before the round is built.
                chosen.append((self._k0 + i, self._dev[i], self._cli[i], self._dur[i], self._drop[i]))
                self.busy.add(self._dev[i])
            if chosen:
                break
            # Nobody eligible and idle now: wait for the next hour or for a late device to free up.
            nxt = self.av.next_open(self.now)
            if self.late:
                nxt = min(nxt, self.late[0][0])
            self.now = nxt
            self._release()
            self._stall_check()
        t0 = self.now
        self._last_start = t0
        self.trips_started += len(chosen)
        out = RoundOutcome(t0, t0, len(chosen))
        finishes = sorted((t0 + dur, tid, d, c) for tid, d, c, dur, drop in chosen if drop == INF)
        ends = [t0 + (dur if drop == INF else drop) for tid, d, c, dur, drop in chosen]
        close = finishes[cohort - 1][0] if len(finishes) >= cohort else max(ends)
        if deadline_s is not None:
            close = min(close, t0 + deadline_s)
        accepted_ids = set()
        for t_end, tid, d, c in finishes:
            if t_end <= close and len(out.accepted) < cohort:
                out.accepted.append((tid, d, c))
                accepted_ids.add(tid)
        for (tid, d, _client, dur, drop), end in zip(chosen, ends):
            out.busy_device_s += min(end, close) - t0
            if tid in accepted_ids:
                self.busy.discard(d)
                continue
            if drop == INF:
                out.late.append(tid)
                out.wasted_device_s += dur
            else:
                out.dropped.append(tid)
                out.wasted_device_s += drop
            if end > close:
                heapq.heappush(self.late, (end, d))
            else:
                self.busy.discard(d)
        if self.trace is not None:
            for tid, d, *_ in chosen:
                self.trace.append((t0, "start", tid, d, -1))
            for tid, d, _client, dur, drop in chosen:
                kind = "done" if tid in accepted_ids else ("late" if drop == INF else "drop")
                self.trace.append((t0 + (dur if drop == INF else drop), kind, tid, d, -1))
        out.t_close = close
        self.now = close
        return out

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {
            "late_t": np.array([t for t, _ in self.late], dtype=np.float64),
            "late_dev": np.array([d for _, d in self.late], dtype=np.int64),
            "scalars_f": np.array([self.now, self._last_start], dtype=np.float64),
            "scalars_i": np.array([self.next_candidate, self.trips_started], dtype=np.int64),
        }

    def load_state_arrays(self, s: dict[str, np.ndarray]) -> None:
        self.late = [(float(t), int(d)) for t, d in zip(s["late_t"], s["late_dev"])]
        heapq.heapify(self.late)
        self.busy = {d for _, d in self.late}
        self.now, self._last_start = (float(x) for x in s["scalars_f"])
        k, self.trips_started = (int(x) for x in s["scalars_i"])
        self._seek(k)
