"""Safe rollouts: a candidate version answers a share of traffic (canary) or a mirrored copy of it
(shadow) beside the stable version, and is promoted or rolled back on figures.

The rollout itself lives in the model's pointer (`active.json`, key "rollout": see
`headswap.registry.registry`), so every replica on one store follows the same one at its next poll
and a decision is one conditional update of that pointer. What lives here is per process:

- routing: a request that names no version goes to the candidate at the rollout's percentage;
  sticky per routing key (a hash of the key and the rollout's id), by weight when there is none;
- figures per version for the running rollout: requests, errors, latency (p50/p99 over the last
  LATENCY_WINDOW answers), and in shadow mode the candidate's top-1 agreement with stable;
- the shadow worker: one thread and a bounded queue. A mirrored request is dropped (and counted)
  when the queue is full, and only requests of at most --max-batch-size images are mirrored, so
  the memory held for shadow work is bounded; the caller never waits for it;
- the decision: once the candidate has --rollout-min-requests answers here, the rules are applied
  to this process's figures, and the outcome is handed to `on_decision` (the manager, which writes
  it with the conditional update: when two replicas decide at once the second finds the rollout
  gone and does nothing).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import random
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from headswap import metrics
from headswap.config import Settings
from headswap.errors import Cancelled, DeadlineExceeded, FailedPrecondition, InvalidInput, ResourceExhausted

log = logging.getLogger(__name__)
audit_log = logging.getLogger("headswap.audit")  # the audit trail's logger (headswap.api.auth)

MODES = ("canary", "shadow")
CANARY, SHADOW = MODES
PROMOTED, ROLLED_BACK, ABORTED = "promoted", "rolled_back", "aborted"
LATENCY_WINDOW = 10_000  # latencies kept per version for p50/p99
MAX_EVENTS = 20  # events kept on a rollout's status
SHADOW_NICE = 19  # the shadow thread's priority where SCHED_IDLE is refused: the lowest nice
# Errors that say something about the caller or the load, not about the version that answered.
CALLER_ERRORS = (InvalidInput, Cancelled, DeadlineExceeded, ResourceExhausted)


def now_text() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class Rules:
    """When a candidate is promoted: enough answers, errors and p99 close to stable's, agreement."""

    min_requests: int
    error_margin: float
    p99_factor: float
    agreement_floor: float

    @classmethod
    def from_settings(cls, settings: Settings) -> "Rules":
        return cls(settings.rollout_min_requests, settings.rollout_error_margin, settings.rollout_p99_factor,
                   settings.rollout_agreement_floor)


@dataclass(frozen=True)
class Rollout:
    """One rollout as the pointer holds it."""

    id: str
    stable: int
    candidate: int
    mode: str
    percent: int
    manual: bool
    rules: Rules
    started: str = ""
    started_by: str = ""
    events: tuple[dict[str, Any], ...] = ()

    @classmethod
    def new(cls, stable: int, candidate: int, mode: str, percent: int, manual: bool, rules: Rules,
            started_by: str) -> "Rollout":
        check_request(mode, percent)
        what = (f"started: {mode} {percent}% of requests to version {candidate} beside stable version {stable}"
                f"{' (manual: ends only by promote or abort)' if manual else ''}, by {started_by}")
        return cls(uuid.uuid4().hex[:12], stable, candidate, mode, percent, manual, rules, now_text(), started_by,
                   ({"time": time.time(), "what": what, "figures": {}},))

    @classmethod
    def from_dict(cls, value: dict[str, Any] | None) -> "Rollout | None":
        if not value:
            return None
        return cls(str(value["id"]), int(value["stable"]), int(value["candidate"]), str(value["mode"]),
                   int(value["percent"]), bool(value.get("manual")), Rules(**value["rules"]),
                   str(value.get("started", "")), str(value.get("started_by", "")),
                   tuple(value.get("events", ())))

    def to_dict(self) -> dict[str, Any]:
        value = asdict(self)
        value["events"] = list(self.events)[-MAX_EVENTS:]
        return value

    def picks_candidate(self, routing_key: str | None) -> bool:
        """Whether a request goes to (canary) or is mirrored to (shadow) the candidate: the same
        answer for one routing key throughout the rollout; by weight for a request without one."""
        if routing_key:
            digest = hashlib.sha256(f"{self.id}\0{routing_key}".encode(errors="replace")).digest()
            return int.from_bytes(digest[:8], "big") % 10_000 < self.percent * 100
        return random.random() * 100 < self.percent


def check_request(mode: str, percent: int) -> None:
    if mode not in MODES:
        raise InvalidInput(f"rollout mode must be canary or shadow, got {mode!r}")
    if isinstance(percent, bool) or not isinstance(percent, int) or not 1 <= percent <= 99:
        raise InvalidInput(f"the rollout percentage must be a whole number from 1 to 99, got {percent}")


@dataclass
class Figures:
    """One version's figures in one rollout, in this process."""

    version: int
    role: str  # stable or candidate
    requests: int = 0
    errors: int = 0
    latencies_s: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    compared: int = 0  # shadow: images compared with stable's answer
    agreed: int = 0
    dropped: int = 0  # shadow: mirrored requests dropped (queue full) or skipped (too large)

    def summary(self) -> dict[str, Any]:
        latencies = np.fromiter(self.latencies_s, dtype=np.float64) if self.latencies_s else None
        return {"version": self.version, "role": self.role, "requests": self.requests, "errors": self.errors,
                "error_rate": round(self.errors / self.requests, 4) if self.requests else 0.0,
                "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 2) if latencies is not None else 0.0,
                "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 2) if latencies is not None else 0.0,
                "compared": self.compared, "agreed": self.agreed,
                "agreement": round(self.agreed / self.compared, 4) if self.compared else 0.0,
                "dropped": self.dropped}


@dataclass(frozen=True)
class Decision:
    outcome: str  # PROMOTED or ROLLED_BACK
    reason: str
    figures: dict[str, Any]


def decide(rollout: Rollout, stable: dict[str, Any], candidate: dict[str, Any]) -> Decision | None:
    """The rules applied to the two versions' figures; None while the candidate has too few answers."""
    rules = rollout.rules
    if candidate["requests"] < rules.min_requests:
        return None
    failed, passed = [], []
    limit = stable["error_rate"] + rules.error_margin
    (failed if candidate["error_rate"] > limit else passed).append(
        f"error rate {candidate['error_rate']:.4f} vs stable {stable['error_rate']:.4f} + margin "
        f"{rules.error_margin:g} = {limit:.4f}")
    if stable["p99_ms"] and candidate["p99_ms"]:
        limit_ms = stable["p99_ms"] * rules.p99_factor
        (failed if candidate["p99_ms"] > limit_ms else passed).append(
            f"p99 {candidate['p99_ms']:.2f} ms vs stable {stable['p99_ms']:.2f} ms x {rules.p99_factor:g} = "
            f"{limit_ms:.2f} ms")
    if rollout.mode == SHADOW:
        (failed if candidate["agreement"] < rules.agreement_floor else passed).append(
            f"top-1 agreement {candidate['agreement']:.4f} ({candidate['agreed']}/{candidate['compared']} images) "
            f"vs floor {rules.agreement_floor:g}")
    figures = {"stable": stable, "candidate": candidate, "rules": asdict(rules)}
    if failed:
        return Decision(ROLLED_BACK, f"rolled back after {candidate['requests']} candidate requests: "
                        + "; ".join(f"FAILED {item}" for item in failed)
                        + "".join(f"; passed {item}" for item in passed), figures)
    return Decision(PROMOTED, f"promoted after {candidate['requests']} candidate requests: "
                    + "; ".join(f"passed {item}" for item in passed), figures)


def audit_decision(name: str, rollout: Rollout, outcome: str, reason: str, who: str) -> None:
    """One audit line per decision, naming the figures (the same fields as headswap.api.auth's)."""
    fields = {"who": who, "via": "rollout" if who == "rollout" else "call", "method": "RolloutDecision",
              "service": "headswap.v1.Models", "result": outcome, "model": name, "version": rollout.candidate,
              "stable": rollout.stable, "mode": rollout.mode, "percent": rollout.percent}
    audit_log.info("audit %s reason=%r", " ".join(f"{k}={v}" for k, v in fields.items()), reason,
                   extra=dict(fields, reason=reason))


@dataclass(frozen=True)
class Route:
    """Where one request goes: the version to lease (0: the active one), and the rollout it counts in."""

    version: int
    rollout: Rollout | None = None
    mirror: bool = False


NO_ROUTE = Route(0)


@dataclass
class _Tracked:
    rollout: Rollout
    figures: dict[int, Figures]
    deciding: bool = False


ShadowRun = Callable[[str, int, list[np.ndarray]], np.ndarray]


class Rollouts:
    """The rollouts this process follows: routing, figures, shadow work and the decision trigger."""

    def __init__(self, settings: Settings, shadow_run: ShadowRun,
                 on_decision: Callable[[str, Rollout, Decision], None]) -> None:
        self.settings = settings
        self._shadow_run = shadow_run  # (name, version, chunks) -> probabilities, through the candidate's batcher
        self._on_decision = on_decision
        self._lock = threading.Lock()
        self._tracked: dict[str, _Tracked] = {}
        self._shadow: queue.Queue = queue.Queue(maxsize=settings.rollout_shadow_queue)
        self._shadow_busy = 0
        self._idle = threading.Condition(self._lock)
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()

    def close(self) -> None:
        self._stop.set()
        if self._worker is not None:
            self._shadow.put(None)

    # --- following the pointer -------------------------------------------------------------

    def follow(self, name: str, rollout: Rollout | None) -> None:
        """The pointer's rollout for `name` (None: none runs); figures restart with a new rollout."""
        with self._lock:
            tracked = self._tracked.get(name)
            if rollout is None:
                self._tracked.pop(name, None)
                return
            if tracked is not None and tracked.rollout.id == rollout.id:
                tracked.rollout = rollout
                return
            self._tracked[name] = _Tracked(rollout, {
                rollout.stable: Figures(rollout.stable, "stable"),
                rollout.candidate: Figures(rollout.candidate, "candidate")})
            if rollout.mode == SHADOW and self._worker is None:
                self._worker = threading.Thread(target=self._shadow_loop, name="rollout-shadow", daemon=True)
                self._worker.start()
        log.info("model %s: following rollout %s: %s %d%% to version %d beside version %d", name, rollout.id,
                 rollout.mode, rollout.percent, rollout.candidate, rollout.stable)

    def current(self, name: str) -> Rollout | None:
        with self._lock:
            tracked = self._tracked.get(name)
            return tracked.rollout if tracked else None

    def figures(self, name: str, rollout_id: str) -> list[dict[str, Any]]:
        """This process's figures for a running rollout (stable first); [] when it follows another."""
        with self._lock:
            tracked = self._tracked.get(name)
            if tracked is None or tracked.rollout.id != rollout_id:
                return []
            return [f.summary() for f in sorted(tracked.figures.values(), key=lambda f: f.role != "stable")]

    # --- requests --------------------------------------------------------------------------

    def route(self, name: str, version: int, routing_key: str | None) -> Route:
        """The version a request for (name, version) takes. A request naming a version gets it."""
        tracked = self._tracked.get(name)  # a dict read: no lock on the path every request takes
        if tracked is None:
            return NO_ROUTE if not version else Route(version)
        rollout = tracked.rollout
        if version and version not in (rollout.stable, rollout.candidate):
            return Route(version)
        if version:  # named explicitly: counted, never re-routed or mirrored
            return Route(version, rollout)
        picked = rollout.picks_candidate(routing_key)
        if rollout.mode == CANARY:
            return Route(rollout.candidate if picked else rollout.stable, rollout)
        return Route(rollout.stable, rollout, mirror=picked)

    def record(self, name: str, route: Route, version: int, seconds: float, error: BaseException | None) -> None:
        """One answer (or failure) of `version` in the route's rollout."""
        rollout = route.rollout
        if rollout is None:
            return
        if error is not None and isinstance(error, CALLER_ERRORS + (FailedPrecondition,)) and \
                not isinstance(error, ResourceExhausted):
            return  # the caller's mistake (or a cancel): says nothing about the version
        self._count(name, rollout, version, seconds, error is not None)

    def _count(self, name: str, rollout: Rollout, version: int, seconds: float, failed: bool,
               compared: int = 0, agreed: int = 0) -> None:
        with self._lock:
            tracked = self._tracked.get(name)
            if tracked is None or tracked.rollout.id != rollout.id or version not in tracked.figures:
                return
            figures = tracked.figures[version]
            figures.requests += 1
            if failed:
                figures.errors += 1
            else:
                figures.latencies_s.append(seconds)
            figures.compared += compared
            figures.agreed += agreed
            candidate = tracked.figures[rollout.candidate]
            ready = (not rollout.manual and not tracked.deciding and version == rollout.candidate
                     and candidate.requests >= rollout.rules.min_requests)
            if ready:
                tracked.deciding = True
        labels = (name, str(version), figures.role)
        metrics.ROLLOUT_REQUESTS.labels(*labels).inc()
        if failed:
            metrics.ROLLOUT_ERRORS.labels(*labels).inc()
        else:
            metrics.ROLLOUT_LATENCY.labels(*labels).observe(seconds)
        if compared:
            metrics.SHADOW_COMPARED.labels(name, str(version)).inc(compared)
            metrics.SHADOW_AGREED.labels(name, str(version)).inc(agreed)
        if ready:
            threading.Thread(target=self._decide, args=(name, rollout), name="rollout-decision", daemon=True).start()

    def mirror(self, name: str, route: Route, copy: ShadowInput, stable: np.ndarray) -> None:
        """Queue a copy of a stable answer's input for the candidate; dropped (and counted) when
        the queue is full or the request is larger than one batch."""
        rollout = route.rollout
        assert rollout is not None
        if copy.too_large or copy.chunk is None:
            self._dropped(name, rollout, "too large")
            return
        try:
            self._shadow.put_nowait((name, rollout, [copy.chunk], stable))
        except queue.Full:
            self._dropped(name, rollout, "queue full")

    def _dropped(self, name: str, rollout: Rollout, why: str) -> None:
        with self._lock:
            tracked = self._tracked.get(name)
            if tracked is not None and tracked.rollout.id == rollout.id:
                tracked.figures[rollout.candidate].dropped += 1
        metrics.SHADOW_DROPPED.labels(name, str(rollout.candidate), why).inc()

    def wait_shadow_idle(self, timeout: float) -> bool:
        """For tests and benchmarks: wait until queued shadow work is done."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._shadow.unfinished_tasks or self._shadow_busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.05))
        return True

    def _shadow_loop(self) -> None:
        # Shadow work takes only the CPU that stable answers leave, so under load the shadow queue
        # fills and mirrors are dropped. Linux's SCHED_IDLE for this thread alone: any thread that
        # answers a caller preempts it at once on waking. Nice 19 is not enough under the EEVDF
        # scheduler: a waking thread may wait out the shadow thread's slice (measured: stable p99
        # 1.12-1.21x with a 50% shadow on 2 cores, bench/bench_rollout.py).
        _lowest_priority()
        while not self._stop.is_set():
            item = self._shadow.get()
            try:
                if item is None:
                    return
                name, rollout, chunks, stable = item
                with self._lock:
                    self._shadow_busy += 1
                started = time.perf_counter()
                try:
                    answer = self._shadow_run(name, rollout.candidate, chunks)
                except Exception as err:  # the candidate failed: counted as its error, never the caller's
                    log.debug("shadow run of %s version %d failed: %s", name, rollout.candidate, err)
                    failed = not isinstance(err, CALLER_ERRORS) or isinstance(err, ResourceExhausted)
                    if failed:
                        self._count(name, rollout, rollout.candidate, 0.0, True)
                    continue
                finally:
                    with self._lock:
                        self._shadow_busy -= 1
                seconds = time.perf_counter() - started
                self._rest(seconds)
                agreed = int(np.sum(np.argmax(answer, axis=-1) == np.argmax(stable, axis=-1))) \
                    if answer.shape == stable.shape else 0
                self._count(name, rollout, rollout.candidate, seconds, False, compared=len(stable), agreed=agreed)
            finally:
                self._shadow.task_done()
                with self._idle:
                    self._idle.notify_all()

    def _rest(self, seconds: float) -> None:
        """After a shadow run of `seconds`, rest so that shadow work takes at most
        --rollout-shadow-cpu-share of one core: a candidate on the idle core still competes with
        stable answers for memory bandwidth and caches (measured on 2 cores, one client, a 50% shadow:
        stable p99 1.29x with no rest, 1.09x at a 0.25 share, 0.97x at the default 0.1)."""
        share = self.settings.rollout_shadow_cpu_share
        if share < 1:
            self._stop.wait(seconds * (1 / share - 1))

    # --- deciding --------------------------------------------------------------------------

    def _decide(self, name: str, rollout: Rollout) -> None:
        figures = {f["role"]: f for f in self.figures(name, rollout.id)}
        decision = decide(rollout, figures["stable"], figures["candidate"]) if len(figures) == 2 else None
        if decision is None:
            return
        try:
            self._on_decision(name, rollout, decision)
        except Exception as err:  # the store failed: try again with the next answer
            log.warning("model %s: rollout %s: could not record the decision (%s): %s", name, rollout.id,
                        decision.outcome, err)
            with self._lock:
                tracked = self._tracked.get(name)
                if tracked is not None and tracked.rollout.id == rollout.id:
                    tracked.deciding = False


@dataclass
class ShadowInput:
    """A mirrored request's model input: its one chunk (a request of at most --max-batch-size
    images is one chunk); a longer request is not kept (`too_large`), so shadow work never holds
    more than one batch per queued request."""

    chunk: np.ndarray | None = None
    too_large: bool = False

    def passing(self, chunks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        """Pass the request's chunks through, keeping the first (and only) one."""
        for chunk in chunks:
            if self.chunk is None and not self.too_large:
                self.chunk = chunk
            else:
                self.chunk, self.too_large = None, True
            yield chunk


def _lowest_priority() -> None:
    """The calling thread runs only when nothing else wants the CPU (SCHED_IDLE), else at nice 19."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread, on Linux
    except (OSError, AttributeError):
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SHADOW_NICE)
