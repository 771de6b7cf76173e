"""Which model versions are resident, and hot swap between them.

Swap = load, warm up, flip, drain (TF Serving's availability-preserving transition): the new
version is loaded and warmed up beside the old one, new requests are switched to it, requests
already holding the old one finish on it, and the old one is freed when the last lets go.
The active version is followed by polling the registry (any process may change it) and at once
for changes made through this process's own API.

Residency bounds (--max-loaded-models, --memory-budget-mb) hold for every load, whether a new
active version or a version a request names: room is made before a load starts, by unloading
idle versions (those only pinned calls use first, then active ones; least recently used first), and counts versions still loading and retired versions that
requests still hold. When every resident version is serving a request, the load is refused with
RESOURCE_EXHAUSTED naming the bound (30 concurrent calls pinning 30 versions had loaded all 30:
2.5 GB against a 300 MB budget).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from headswap import metrics
from headswap.config import Settings
from headswap.errors import CorruptModel, FailedPrecondition, InvalidInput, NotFound, ResourceExhausted, Unavailable
from headswap.inference.batcher import Batcher
from headswap.inference.memory import return_freed_memory
from headswap.inference.rollout import PROMOTED, Decision, Rollout, Rollouts, Rules, audit_decision, check_request
from headswap.inference.runtime import ModelRuntime, expected_bytes, load_runtime
from headswap.registry.registry import LAST_ROLLOUT, ROLLOUT, Registry

log = logging.getLogger(__name__)

Key = tuple[str, int]


@dataclass
class LoadedModel:
    """A resident version with its batcher; `inflight` counts the requests holding it."""

    runtime: ModelRuntime
    batcher: Batcher
    inflight: int = 0
    retired: bool = False
    last_used: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> Key:
        return self.runtime.name, self.runtime.version


class ModelManager:
    """Loads versions from the registry on demand, follows active pointers, bounds residency."""

    def __init__(self, registry: Registry, settings: Settings,
                 on_ready_change: Callable[[str, bool], None] | None = None) -> None:
        self.registry = registry
        self.settings = settings
        self._on_ready_change = on_ready_change or (lambda name, ready: None)
        self._lock = threading.RLock()
        self._loaded: dict[Key, LoadedModel] = {}
        self._active: dict[str, Key] = {}  # model name -> key of the version new requests take
        self._load_locks: dict[Key, threading.Lock] = {}
        self._refused: set[Key] = set()  # corrupt versions, logged once and not retried
        self._loading: dict[Key, int] = {}  # versions being loaded -> the bytes they will take
        self._draining: dict[int, LoadedModel] = {}  # retired versions that requests still hold
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        # The rollouts in the pointers this process follows (routing, figures, shadow, decisions).
        self.rollouts = Rollouts(settings, self._shadow_run, self._decided)

    # --- lifecycle -------------------------------------------------------------------------

    def start_polling(self) -> None:
        self._poller = threading.Thread(target=self._poll_loop, name="registry-poller", daemon=True)
        self._poller.start()

    def close(self) -> None:
        self._stop.set()
        self.rollouts.close()
        if self._poller:
            self._poller.join(timeout=5)
        with self._lock:
            models = list(self._loaded.values())
            self._loaded.clear()
            self._active.clear()
        for model in models:
            model.batcher.close()

    # --- requests --------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, name: str, version: int = 0) -> Iterator[LoadedModel]:
        """Hold a loaded version for one request; it is not freed while held."""
        model = self._acquire(name, version)
        try:
            yield model
        finally:
            self._release(model)

    def _acquire(self, name: str, version: int) -> LoadedModel:
        with self._lock:
            key = self._active.get(name) if not version else (name, version)
            model = self._loaded.get(key) if key else None
            if model is not None and not model.retired:
                model.inflight += 1
                model.last_used = time.monotonic()
                return model
        if not version:
            self.refresh(name)
            with self._lock:
                key = self._active.get(name)
        else:
            key = (name, self.registry.resolve(name, version))
            # held from the moment it is loaded: making room for another load must not unload it first
            return self._load(key, evict_active=False, acquire=True)
        with self._lock:
            model = self._loaded.get(key) if key else None
            if model is None or model.retired:
                raise Unavailable(f"model {name!r} is being reloaded; retry")
            model.inflight += 1
            model.last_used = time.monotonic()
            return model

    def _release(self, model: LoadedModel) -> None:
        with self._lock:
            model.inflight -= 1
            free = model.retired and model.inflight == 0
        if free:
            self._free(model)

    # --- loading and swapping --------------------------------------------------------------

    def refresh(self, name: str) -> None:
        """Make the registry's active version of `name` the one new requests take, and follow its
        rollout (the candidate is loaded beside it)."""
        state = self.registry.active_state(name)
        version = int(state["version"]) if state.get("version") is not None else None
        try:
            rollout = Rollout.from_dict(state.get(ROLLOUT))
        except (KeyError, TypeError, ValueError) as err:
            log.warning("model %s: ignoring an unreadable rollout in its pointer: %s", name, err)
            rollout = None
        try:
            self._swap_to(name, version)
        finally:
            self.rollouts.follow(name, rollout if version is not None else None)
        if rollout is not None:
            self._preload(name, rollout.candidate)

    def _preload(self, name: str, version: int) -> None:
        """Load a rollout's candidate ahead of its first request (best effort: requests load it too)."""
        with self._lock:
            model = self._loaded.get((name, version))
        if (model is not None and not model.retired) or (name, version) in self._refused:
            return  # loaded, or refused as corrupt (logged once; its requests fail and count)
        try:
            self._load((name, version), evict_active=False)
        except Exception as err:  # counted as the candidate's errors when its requests fail too
            log.warning("model %s: rollout candidate version %d not loaded: %s", name, version, err)

    def _swap_to(self, name: str, version: int | None) -> None:
        if version is None:
            self.registry.resolve(name)  # NotFound, or FailedPrecondition "none is active yet; activate one"
            raise NotFound(f"unknown model {name!r}; models in the registry: "
                           f"{', '.join(self.registry.models()) or 'none'}")
        key = (name, version)
        with self._lock:
            if self._active.get(name) == key and key in self._loaded:
                return
        if key in self._refused:
            with self._lock:
                if name in self._active:
                    return  # keep serving the previous version
            raise Unavailable(f"model {name!r} version {version} was refused as corrupt and no "
                              "earlier version is loaded; activate a good version")
        with self._lock:
            replacing = self._active.get(name)
        # Held while it becomes active: making room for another load must not unload it in between.
        loaded = self._load(key, replacing=replacing, acquire=True)
        try:
            with self._lock:
                previous = self._active.get(name)
                if previous == key:
                    return
                self._active[name] = key
                metrics.SWAPS.labels(name).inc()
            log.info("model %s: version %s now active (was %s)", name, version, previous and previous[1])
            self._on_ready_change(name, True)
            if previous is not None:
                self._retire(previous)
            self._enforce_budget(keep=key)
        finally:
            self._release(loaded)

    def _load(self, key: Key, replacing: Key | None = None, evict_active: bool = True,
              acquire: bool = False) -> LoadedModel:
        """Load and warm up a version, within the residency bounds; `replacing` is the active
        version it is about to take over from, which does not count against them. A load for a
        pinned call (`evict_active=False`) never unloads an active version: unpinned traffic
        keeps its model, and the pinned call is refused instead when nothing else is idle.
        `acquire`: the caller holds the version (as `lease` does) from the moment it is there."""
        with self._lock:
            lock = self._load_locks.setdefault(key, threading.Lock())
        with lock:  # one load per version, however many requests ask at once
            with self._lock:
                existing = self._loaded.get(key)
                if existing is not None and not existing.retired:
                    if acquire:
                        existing.inflight += 1
                        existing.last_used = time.monotonic()
                    return existing
            name, version = key
            started = time.monotonic()
            s = self.settings
            try:
                path, manifest = self.registry.verified_model_path(name, version)
            except CorruptModel as err:
                self._refuse(key, err)
                raise
            self._make_room(key, expected_bytes(path, manifest, s.cpu_threads, s.lanes, s.intra_op_spinning),
                            replacing, evict_active)
            try:
                files = self.registry.verified_extra_files(name, version, manifest)
                runtime = load_runtime(name, version, path, manifest, self.settings.cpu_threads,
                                       spinning=self.settings.intra_op_spinning, lanes=self.settings.lanes, files=files)
                runtime.warm_up()
                lanes = [functools.partial(runtime.infer, lane=lane) for lane in range(runtime.lane_count)]
                batcher = Batcher(lanes, f"{name}:{version}", s.max_batch_size,
                                  s.batch_timeout_ms / 1000.0, s.max_queue, stats=runtime.stats,
                                  infer_lone=runtime.infer_lone, cpu_timed=runtime.lane_runs_on_caller)
            except BaseException as err:
                with self._lock:
                    self._loading.pop(key, None)
                if isinstance(err, CorruptModel):
                    self._refuse(key, err)
                raise
            model = LoadedModel(runtime, batcher, inflight=int(acquire))
            with self._lock:  # loaded and no longer loading in one step: the bounds never count it twice or not at all
                self._loading.pop(key, None)
                self._loaded[key] = model
                metrics.LOADED_MODELS.set(len(self._loaded))
            log.info("loaded %s version %s in %.2fs (%d inference lane%s)", name, version,
                     time.monotonic() - started, runtime.lane_count, "" if runtime.lane_count == 1 else "s")
            return model

    def _refuse(self, key: Key, err: CorruptModel) -> None:
        """A corrupt version: logged once, counted, and not retried until activated again."""
        self._refused.add(key)
        metrics.LOAD_FAILURES.labels(key[0]).inc()
        log.error("refusing %s version %s: %s", *key, err)

    def _retire(self, key: Key) -> None:
        with self._lock:
            model = self._loaded.pop(key, None)
            if model is None:
                return
            model.retired = True
            metrics.LOADED_MODELS.set(len(self._loaded))
            free = model.inflight == 0
            if not free:
                self._draining[id(model)] = model
        if free:
            self._free(model)

    def _free(self, model: LoadedModel) -> None:
        with self._lock:
            self._draining.pop(id(model), None)
        model.batcher.close()
        model.runtime.close()
        return_freed_memory()
        log.info("unloaded %s version %s", *model.key)

    def _make_room(self, key: Key, size: int, replacing: Key | None, evict_active: bool = True) -> None:
        """Before loading `key` (about `size` bytes): unload least recently used idle versions
        until it fits both bounds, and reserve its place; ResourceExhausted, naming the bound,
        when what is resident is busy serving. `replacing` (the active version a swap retires)
        does not count."""
        s = self.settings
        budget = s.memory_budget_mb * 1024 * 1024
        victims: list[LoadedModel] = []
        with self._lock:
            while True:
                held = [m for m in self._loaded.values() if m.key != replacing]
                count = len(held) + len(self._loading) + len(self._draining) + 1
                total = (sum(m.runtime.size_bytes for m in held) + sum(self._loading.values())
                         + sum(m.runtime.size_bytes for m in self._draining.values()) + size)
                over_count = count > s.max_loaded_models
                over_memory = bool(budget) and total > budget
                if not over_count and not over_memory:
                    break
                idle = [m for m in held if m.inflight == 0
                        and (evict_active or self._active.get(m.key[0]) != m.key)]
                if not idle:
                    name, version = key
                    if over_count:
                        bound = (f"{count - 1} model versions are loaded or loading, and --max-loaded-models is "
                                 f"{s.max_loaded_models}")
                    else:
                        bound = (f"loaded versions take {(total - size) >> 20} MiB and this one needs about "
                                 f"{size >> 20} MiB more, over --memory-budget-mb {s.memory_budget_mb}")
                    raise ResourceExhausted(f"cannot load {name} version {version}: {bound}, and every loaded "
                                            "version is serving requests (or is an active version, which a pinned "
                                            "call does not unload); retry shortly, or call without a version to use "
                                            "the active one")
                # Versions only pinned calls use go before active ones (which every unpinned call
                # needs), least recently used first.
                victim = min(idle, key=lambda m: (self._active.get(m.key[0]) == m.key, m.last_used))
                victims.append(victim)
                self._loaded.pop(victim.key)
                victim.retired = True
                if self._active.get(victim.key[0]) == victim.key:
                    del self._active[victim.key[0]]
            self._loading[key] = size
            metrics.LOADED_MODELS.set(len(self._loaded))
        for victim in victims:
            name = victim.key[0]
            log.info("unloading %s version %s (least recently used, to load %s version %s)", *victim.key, *key)
            with self._lock:
                still_active = name in self._active
            if not still_active:
                self._on_ready_change(name, False)
            self._free(victim)

    def _enforce_budget(self, keep: Key) -> None:
        """Unload least recently used versions over the count or memory budget."""
        budget = self.settings.memory_budget_mb * 1024 * 1024
        while True:
            with self._lock:
                resident = [m for m in self._loaded.values() if m.key != keep]
                total = sum(m.runtime.size_bytes for m in self._loaded.values())
                over = len(self._loaded) > self.settings.max_loaded_models or (budget and total > budget)
                if not over or not resident:
                    return
                victim = min(resident, key=lambda m: m.last_used)
                name, _ = victim.key
                if self._active.get(name) == victim.key:
                    del self._active[name]
            log.info("unloading %s version %s (least recently used, over budget)", *victim.key)
            if name not in self._active:
                self._on_ready_change(name, False)
            self._retire(victim.key)

    def unload(self, name: str) -> None:
        """Unload every resident version of a model (KServe repository unload)."""
        with self._lock:
            keys = [key for key in self._loaded if key[0] == name]
            self._active.pop(name, None)
        if not keys:
            raise NotFound(f"model {name!r} is not loaded")
        for key in keys:
            self._retire(key)
        self._on_ready_change(name, False)

    # --- registry changes ------------------------------------------------------------------

    def activate(self, name: str, version: int) -> None:
        """Load and warm the version first: a corrupt one is refused before the pointer moves."""
        self.registry.resolve(name, version)
        self._refused.discard((name, version))
        with self._lock:
            replacing = self._active.get(name)
        self._load((name, version), replacing=replacing)
        self.registry.activate(name, version)
        self.refresh(name)

    def rollback(self, name: str) -> int:
        version = self.registry.rollback(name)
        self.refresh(name)
        return version

    # --- rollouts (headswap.inference.rollout) ---------------------------------------------

    def start_rollout(self, name: str, version: int, mode: str, percent: int, manual: bool,
                      started_by: str) -> dict[str, Any]:
        """Start a rollout of `version` against the active one: checked, loaded and warmed up first
        (nothing is written when any of it fails), then one conditional update of the pointer."""
        check_request(mode, percent)
        if not self.registry.versions(name):
            raise self._unknown_model(name)
        self.registry.resolve(name, version)  # NotFound names the versions there are
        state = self.registry.active_state(name)
        if state.get("version") is None:
            self.registry.resolve(name)  # NotFound, or FailedPrecondition "none is active yet"
        if state.get(ROLLOUT):
            raise FailedPrecondition(f"model {name!r} already has a rollout of version "
                                     f"{state[ROLLOUT].get('candidate')} in progress; promote or abort it first")
        if int(state["version"]) == version:
            raise InvalidInput(f"version {version} of {name!r} is already the active version; roll out another version")
        self._refused.discard((name, version))
        self._load((name, version), evict_active=False)
        rules = Rules.from_settings(self.settings)
        record = self.registry.start_rollout(
            name, version, lambda stable: Rollout.new(stable, version, mode, percent, manual, rules,
                                                      started_by).to_dict())
        self.refresh(name)
        return record

    def end_rollout(self, name: str, promote: bool, who: str) -> dict[str, Any]:
        """Promote or abort the running rollout by hand; the event carries this process's figures."""
        state = self.registry.active_state(name)
        if not state and not self.registry.versions(name):
            raise self._unknown_model(name)
        running = Rollout.from_dict(state.get(ROLLOUT)) if state.get(ROLLOUT) else None
        if running is None:
            raise FailedPrecondition(f"model {name!r} has no rollout in progress")
        figures = {f["role"]: f for f in self.rollouts.figures(name, running.id)}
        outcome = PROMOTED if promote else "aborted"
        what = f"{outcome} by {who}: version {running.candidate if promote else running.stable} answers"
        event = {"time": time.time(), "what": what, "figures": figures}
        record = self.registry.end_rollout(name, promote, outcome, event, rollout_id=running.id)
        audit_decision(name, running, outcome, f"{what}; figures {figures}", who)
        self.refresh(name)
        return record

    def _decided(self, name: str, rollout: Rollout, decision: Decision) -> None:
        """An automatic decision, written only if that rollout still runs (another replica may have
        ended it first: then nothing changes here but the next poll)."""
        event = {"time": time.time(), "what": decision.reason, "figures": decision.figures}
        try:
            self.registry.end_rollout(name, decision.outcome == PROMOTED, decision.outcome, event,
                                      rollout_id=rollout.id)
        except (FailedPrecondition, NotFound) as err:
            log.info("model %s: rollout %s already ended elsewhere: %s", name, rollout.id, err)
        else:
            log.info("model %s: rollout %s %s", name, rollout.id, decision.reason)
            audit_decision(name, rollout, decision.outcome, decision.reason, "rollout")
        try:
            self.refresh(name)
        except Exception as err:  # the next poll tries again
            log.warning("model %s: refresh after the rollout decision failed: %s", name, err)

    def rollout_status(self, name: str) -> dict[str, Any]:
        """The running rollout (with this process's live figures), else the last one that ended."""
        state = self.registry.active_state(name)
        if not state and not self.registry.versions(name):
            raise self._unknown_model(name)
        running = state.get(ROLLOUT)
        if running:
            return dict(running, running=True, live=self.rollouts.figures(name, str(running.get("id"))))
        last = state.get(LAST_ROLLOUT)
        return dict(last, running=False, live=[]) if last else {"running": False, "live": [], "events": []}

    def _unknown_model(self, name: str) -> NotFound:
        known = ", ".join(self.registry.models()) or "none"
        return NotFound(f"unknown model {name!r}; models in the registry: {known}")

    def _shadow_run(self, name: str, version: int, chunks: list[np.ndarray]) -> np.ndarray:
        """The candidate's answer to a mirrored request, run in the calling (shadow) thread on one
        lane's session: with one intra-op thread per lane, all of its work runs at that thread's
        low priority (`rollout.Rollouts`), not on the batcher's lanes that answer callers."""
        with self.lease(name, version) as loaded:
            runtime = loaded.runtime
            outputs = [runtime.infer(chunk, runtime.lane_count - 1) for chunk in chunks]
        # a version with an out-of-distribution score answers (probabilities, scores): compare the first
        results = [output[0] if isinstance(output, tuple) else output for output in outputs]
        return results[0] if len(results) == 1 else np.concatenate(results)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.settings.poll_interval_s):
            with self._lock:
                names = list(self._active)
            for name in names:
                try:
                    self.refresh(name)
                except Exception as err:  # keep serving what is loaded; the log says why
                    log.warning("poll: keeping the current version of %s: %s", name, err)

    # --- introspection ---------------------------------------------------------------------

    def resident(self, name: str = "") -> list[ModelRuntime]:
        """The loaded versions (of `name`, or of every model), for statistics."""
        with self._lock:
            return sorted((m.runtime for m in self._loaded.values() if not name or m.key[0] == name),
                          key=lambda runtime: (runtime.name, runtime.version))

    def is_ready(self, name: str, version: int = 0) -> bool:
        with self._lock:
            key = self._active.get(name) if not version else (name, version)
            model = self._loaded.get(key) if key else None
            return bool(model and model.runtime.ready.is_set() and not model.retired)
