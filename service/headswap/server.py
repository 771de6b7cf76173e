"""The headswap process: builds the parts a role needs and serves them on one gRPC port.

- role `inference`: registry + model manager + Inference/Models/KServe V2 services. Never imports
  TensorFlow; a default model missing from the registry is waited for (readiness stays false).
- role `trainer`: Training service; fine-tune jobs run in worker subprocesses (TensorFlow). It
  seeds the registry with the default model when it is missing.
- role `all`: both, in one process; a missing default model is exported first, in a
  subprocess, so this process stays free of TensorFlow too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from headswap import metrics
from headswap.admission import Slots, SlotsPerKey
from headswap.api.arrival import RequestArrival
from headswap.api.auth import AuthInterceptor
from headswap.api.labels import model_label
from headswap.api.request_parsing import MalformedRequestInterceptor
from headswap.api.reset_guard import ResetGuard
from headswap.api.stream_limits import HEALTH_WATCH, REFLECTION_METHODS, StreamLimit
from headswap.api.tls import server_credentials
from headswap.config import Settings, env_name
from headswap.protocol import headswap_v1_pb2 as pb
from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc
from headswap.protocol import kserve_v2_pb2 as kserve_pb
from headswap.protocol import kserve_v2_pb2_grpc as kserve_grpc
from headswap.registry.registry import Registry, model_name_for_source
from headswap.security.credentials import CredentialStore
from headswap.thread_pool import ShrinkingThreadPool
from headswap.workdir import WorkDirBusy, lock_work_dir

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# Calls on the health port beyond what its callers can hold (Watch streams, calls waiting for
# their message): for probes.
HEALTH_PORT_RESERVE = 16


def pool_size(settings: Settings) -> int:
    """A thread for every call gRPC admits: no call ever waits for a thread.

    grpc's sync server runs each call on a thread of one pool, and a call holds its thread while
    it waits on its caller: for its request message (`api.arrival`), an upload's next chunk, a
    stream's reader. With fewer threads than admitted calls, slow or idle callers left the rest
    (health checks included) queued behind them. Threads are started only when needed and exit after
    --idle-thread-timeout-s without work (`thread_pool.ShrinkingThreadPool`), and what a
    caller can hold is bounded per kind: inference calls, uploads, WatchJob, reflection and health
    Watch streams each by their own setting, calls waiting for their message per client address.
    (grpc's asyncio server would avoid the threads, but every servicer and the batcher are
    synchronous.)
    """
    return settings.max_concurrent_calls


def health_port_calls(settings: Settings) -> int:
    """Calls (and threads) on the plaintext health port: more than one client can hold there."""
    return settings.max_health_watchers + settings.max_waiting_calls_per_client + HEALTH_PORT_RESERVE


# Streams one HTTP/2 connection may have open at once (grpc's default is unlimited).
MAX_STREAMS_PER_CONNECTION = 256

# Open files beyond client connections: models, the job database, logs, worker pipes.
FILES_RESERVE = 1024


def connection_options(settings: Settings, max_connections: int) -> list[tuple[str, int]]:
    """grpc channel arguments that bound what clients' connections hold: how many are open, how long
    one may take to finish its handshake, stay open with no call, and stay open at all. Without them a
    client opening 19,000 connections that sent nothing held 19,000 file descriptors (the process
    limit was 20,000) and 400 MB, for two minutes each."""
    return [("grpc.so_reuseport", 0),
            # Without a read posted, a stream may buffer only the initial window: with grpc's window
            # probing on, each stream buffered its whole message before its call was admitted (32
            # concurrent 60 MB requests: 1.8 GB resident while 4 were read; 0.6 GB with it off).
            ("grpc.http2.bdp_probe", 0),
            # Rapid reset (api/reset_guard.py does the rest): each reset stream costs the client a PING
            # to answer, and one connection holds at most this many streams at once.
            ("grpc.http2.ping_on_rst_stream_percent", 100), ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
            ("grpc.max_allowed_incoming_connections", max_connections),
            ("grpc.server_handshake_timeout_ms", int(settings.handshake_timeout_s * 1000)),
            ("grpc.max_connection_idle_ms", int(settings.connection_idle_timeout_s * 1000)),
            # The longest any call or stream lives; clients behind a headless Service re-resolve.
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.connection_age_grace_s * 1000))]


def allow_open_files(needed: int) -> None:
    """Raise this process's soft limit on open files towards `needed` (up to the hard limit), so that
    --max-connections is reached before the process runs out of file descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("this process may open %d files (hard limit), but --max-connections and the health port "
                    "need %d with a reserve: lower --max-connections or raise the limit", soft, needed)


class HealthService(health.HealthServicer):
    """grpc's health servicer, answering List (new in the proto, missing from grpcio-health-checking
    1.85, where it raised a traceback into the log) with UNIMPLEMENTED: health is open to every
    caller, and a list of every model name is not for unauthenticated ones. Check and Watch stay."""

    def List(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "grpc.health.v1.Health/List is not served; use Check "
                      "or Watch with a service name ('' = the whole server)")


def default_model_name(settings: Settings) -> str:
    """The registry name the default model is served under."""
    return settings.model_name or model_name_for_source(settings.model)


class HeadswapServer:
    """One gRPC server with the services of the configured role."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings.validate()
        # First of all: a second server on the same work directory must change nothing there.
        self.work_lock = lock_work_dir(settings.work_dir)
        if settings.s3_endpoint_url:  # the object store and worker subprocesses read the environment
            os.environ[env_name("s3_endpoint_url")] = settings.s3_endpoint_url
        os.environ[env_name("store_timeout_s")] = str(settings.store_timeout_s)  # for workers too
        self.registry = Registry(settings.model_dir, cache_dir=Path(settings.work_dir) / "cache",
                                 keep_versions=settings.keep_versions, store_timeout_s=settings.store_timeout_s)
        self.default_model = default_model_name(settings)
        self.health = HealthService(experimental_non_blocking=True)
        self.manager = None
        self.jobs = None
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.port = 0
        self.metrics_port = 0
        options = [("grpc.max_receive_message_length", settings.max_message_bytes),
                   ("grpc.max_send_message_length", settings.max_message_bytes),
                   *connection_options(settings, settings.max_connections)]
        allow_open_files(settings.max_connections + health_port_calls(settings) + FILES_RESERVE)
        # Access control (issue 9): checked here, so that broken TLS or credentials files stop the start.
        self.credentials = CredentialStore(settings.auth_tokens_file) if settings.auth_tokens_file else None
        self.tls = server_credentials(settings)
        self.metrics_tls = metrics.load_tls(settings.metrics_tls_cert_file, settings.metrics_tls_key_file)
        self.health_server: grpc.Server | None = None
        self.health_port = 0
        interceptor = AuthInterceptor(self.credentials, mutual_tls=bool(settings.tls_client_ca_file))
        reflection_limit = StreamLimit(REFLECTION_METHODS, Slots("reflection streams already open",
                                                                 settings.max_reflection_streams,
                                                                 "--max-reflection-streams"))
        pool = ShrinkingThreadPool(pool_size(settings), settings.idle_thread_timeout_s, thread_name_prefix="grpc")
        # arrival first: it wraps the others, so no call waits unbounded for its message, authorised or not
        self.server = grpc.server(pool, options=options, maximum_concurrent_rpcs=settings.max_concurrent_calls,
                                  interceptors=[self._request_arrival(), interceptor, MalformedRequestInterceptor(),
                                                reflection_limit, self._health_watch_limit()])
        services = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if settings.role in ("all", "inference"):
            services += self._add_inference()
        if settings.role in ("all", "trainer"):
            services += self._add_training()
        if settings.reflection:
            reflection.enable_server_reflection(services, self.server)

    def _add_inference(self) -> list[str]:
        from headswap.api.inference_servicer import InferenceServicer, ModelsServicer
        from headswap.api.kserve_servicer import KServeServicer
        from headswap.inference.classifier import Classifier
        from headswap.inference.manager import ModelManager

        self.manager = ModelManager(self.registry, self.settings, on_ready_change=self._model_ready)
        model_label.attach(self.registry.models)  # metric labels: registry models only
        classifier = Classifier(self.manager, self.settings, self.default_model)
        # One caller (a credential, else a client address) cannot take every --max-inference-calls slot.
        callers = SlotsPerKey("inference calls of yours in progress", self.settings.max_inference_calls_per_caller,
                              "--max-inference-calls-per-caller")
        pb_grpc.add_InferenceServicer_to_server(InferenceServicer(classifier, callers), self.server)
        pb_grpc.add_ModelsServicer_to_server(ModelsServicer(self.registry, self.manager), self.server)
        kserve_grpc.add_GRPCInferenceServiceServicer_to_server(
            KServeServicer(classifier, self.registry, self.manager, self.ready, callers), self.server)
        return [pb.DESCRIPTOR.services_by_name[n].full_name for n in ("Inference", "Models")] + [
            kserve_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name]

    def _add_training(self) -> list[str]:
        from headswap.api.training_servicer import TrainingServicer
        from headswap.training.jobs import JobManager

        self.jobs = JobManager(self.settings, self.registry, self.manager)
        pb_grpc.add_TrainingServicer_to_server(TrainingServicer(self.jobs), self.server)
        return [pb.DESCRIPTOR.services_by_name["Training"].full_name]

    def _model_ready(self, name: str, ready: bool) -> None:
        self.health.set(name, SERVING if ready else NOT_SERVING)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> int:
        """Bind every port, then serve; PortUnavailable names the setting of a port that cannot be bound."""
        s = self.settings
        log.info("starting headswap: %s", s.describe())
        address = f"{s.host}:{s.port}"
        with _binding("--port", address):
            self.port = (self.server.add_secure_port(address, self.tls) if self.tls is not None
                         else self.server.add_insecure_port(address))
            if not self.port:
                raise RuntimeError("no address was bound")
        self._warn_if_open()
        if s.metrics_port >= 0:
            metrics_host = (s.metrics_host or s.host).strip("[]")  # gRPC's [::] is HTTP's ::
            with _binding("--metrics-port", f"{metrics_host}:{s.metrics_port}"):
                self.metrics_port = metrics.serve_metrics(s.metrics_port, metrics_host, self.metrics_tls,
                                                          s.metrics_max_connections, s.metrics_timeout_s)
        if s.health_port >= 0:
            with _binding("--health-port", f"{s.host}:{s.health_port}"):
                self._start_health_port()
        self.health.set("", NOT_SERVING)
        self.server.start()
        log.info("gRPC listening on port %d, metrics on %s", self.port, self.metrics_port or "off")
        threading.Thread(target=self._become_ready, name="bootstrap", daemon=True).start()
        return self.port

    def _warn_if_open(self) -> None:
        """Say loudly when the gRPC port is open to the network without TLS or authentication."""
        s = self.settings
        if self.tls is not None and self.credentials is not None:
            log.info("gRPC port: TLS%s, bearer tokens from %s", " with client certificates" if
                     s.tls_client_ca_file else "", s.auth_tokens_file)
            return
        if s.host in ("127.0.0.1", "::1", "localhost"):
            return
        missing = []
        if self.tls is None:
            missing.append("no TLS (plaintext)")
        if self.credentials is None and not s.tls_client_ca_file:
            missing.append("no authentication: every caller may classify, train, activate and roll back models")
        if missing:
            log.warning("!!! gRPC port %s:%d is reachable from the network with %s. Set --tls-cert-file/"
                        "--tls-key-file and --auth-tokens-file (docs/security.md) outside local development.",
                        s.host, self.port, " and ".join(missing))

    def _request_arrival(self) -> RequestArrival:
        """Each port's own: its per-address counts and byte budget are not shared with the other port."""
        s = self.settings
        return RequestArrival(s.request_arrival_timeout_s, s.max_waiting_calls_per_client,
                              s.max_request_bytes_in_flight,
                              ResetGuard(s.max_resets_per_connection, plaintext=self.tls is None))

    def _health_watch_limit(self) -> StreamLimit:
        """Open health Watch streams on one port: health is open to every caller, and each stream
        holds a thread (the interceptors' wrappers leave grpc's health servicer in its blocking mode)."""
        return StreamLimit(HEALTH_WATCH, Slots("health Watch streams already open on this port",
                                               self.settings.max_health_watchers, "--max-health-watchers"))

    def _start_health_port(self) -> None:
        """A second, plaintext server with grpc.health.v1 only: kubelet gRPC probes do not speak TLS."""
        s = self.settings
        calls = health_port_calls(s)
        self.health_server = grpc.server(ShrinkingThreadPool(calls, s.idle_thread_timeout_s, "health"),
                                         options=connection_options(s, calls), maximum_concurrent_rpcs=calls,
                                         interceptors=[self._request_arrival(), self._health_watch_limit()])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        self.health_port = self.health_server.add_insecure_port(f"{s.host}:{s.health_port}")
        if not self.health_port:
            raise RuntimeError("no address was bound")
        self.health_server.start()
        log.info("health port %d: plaintext, grpc.health.v1 only", self.health_port)

    def _become_ready(self) -> None:
        """Make sure the default model is there and loaded, then report SERVING."""
        if self.settings.role in ("all", "trainer"):
            self._remove_abandoned()
        try:
            self._ensure_default_model()
            if self.manager is not None:
                while not self._load_default_model():
                    if self.stopping.wait(self.settings.poll_interval_s):
                        return
                self.manager.start_polling()
            if self.jobs is not None:
                self.jobs.start()
        except Exception:
            log.exception("start-up failed; the server stays NOT_SERVING")
            return
        self.ready.set()
        self.health.set("", SERVING)
        log.info("ready: default model %s", self.default_model)

    def _remove_abandoned(self) -> None:
        """What writers killed midway left in the registry: staged versions and exports."""
        try:
            removed = self.registry.remove_abandoned(self.settings.abandoned_after_s)
        except Exception as err:  # housekeeping: never a reason not to serve
            log.warning("registry clean-up failed: %s", err)
            return
        if removed:
            log.info("removed %d abandoned staging entries from the registry: %s", len(removed), removed[:10])

    def _load_default_model(self) -> bool:
        """Load the default model's active version; False (retried later) when it cannot be."""
        try:
            self.manager.refresh(self.default_model)
            return True
        except Exception as err:
            log.error("default model %s not loaded, retrying: %s", self.default_model, err)
            return False

    def _ensure_default_model(self) -> None:
        if self.registry.versions(self.default_model):
            return
        if self.settings.role == "inference":  # no TensorFlow here: a trainer or `headswap export` seeds it
            log.info("waiting for model %s to appear in %s", self.default_model, self.registry.url)
            while not self.registry.versions(self.default_model):
                if self.stopping.wait(self.settings.poll_interval_s):
                    return
            return
        log.info("exporting %s as %s into %s (first start)", self.settings.model, self.default_model,
                 self.registry.url)
        command = [sys.executable, "-m", "headswap.cli", "export", self.settings.model,
                   "--name", self.default_model, "--model-dir", self.settings.model_dir]
        if self.settings.weights:
            command += ["--weights", self.settings.weights]
        # A subprocess: TensorFlow's memory and threads go away with it.
        subprocess.run(command, check=True)

    def stop(self) -> None:
        """Drain: NOT_SERVING, refuse new calls, let in-flight ones finish within the grace period."""
        log.info("shutting down: draining for up to %.1fs", self.settings.grace_period_s)
        self.stopping.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(self.settings.grace_period_s).wait()
        if self.health_server is not None:
            self.health_server.stop(0)
        if self.jobs is not None:
            self.jobs.close()
        if self.manager is not None:
            self.manager.close()
        log.info("stopped")


class PortUnavailable(RuntimeError):
    """A port the settings name cannot be bound (in use, or not permitted)."""


@contextlib.contextmanager
def _binding(setting: str, address: str) -> Iterator[None]:
    """grpc raises RuntimeError and the metrics server OSError for a port in use: say which setting it is."""
    try:
        yield
    except (RuntimeError, OSError) as err:
        reason = str(err).rstrip(".")
        raise PortUnavailable(f"cannot listen on {address} ({setting}): {reason}. Is another server using it? "
                              f"Choose another {setting}, or 0 for a free port") from None


def run(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return (exit code 0)."""
    from headswap.inference.memory import limit_malloc_arenas

    limit_malloc_arenas()  # before any thread starts: resident memory stays flat across swaps
    try:
        server = HeadswapServer(settings)
    except (ValueError, WorkDirBusy) as err:  # unusable TLS/credentials files, a taken work dir: no traceback
        raise SystemExit(f"headswap: {err}") from None
    try:
        server.start()
    except PortUnavailable as err:
        raise SystemExit(f"headswap: {err}") from None
    stopping = threading.Event()

    def on_signal(signum, frame) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopping.wait()
    server.stop()
