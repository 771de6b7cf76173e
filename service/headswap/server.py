"""The headswap process: builds the parts a role needs and serves them on one gRPC port.

- role `inference`: registry + model manager + Inference/Models/KServe V2 services. Never imports
  TensorFlow; a default model missing from the registry is waited for (readiness stays false).
- role `trainer`: Training service; fine-tune jobs run in worker subprocesses (TensorFlow). It
  seeds the registry with the default model when it is missing.
- role `all`: both, in one process; a missing default model is exported first, in a
  subprocess, so this process stays free of TensorFlow too.

Start-up (issue 24): what waiting cannot heal (a failed export, a --weights file that cannot be read,
a --model-dir that is a file) ends the process with a non-zero exit and the cause on one line, within
a second of being found; what can heal (a model store that does not answer, an inference replica's
model not yet in the store) is retried, and said in the log at a steady interval.

Stop: a drain never outlasts --grace-period-s by more than DRAIN_EXIT_MARGIN_S: calls still running
at the limit are ended with UNAVAILABLE (`api.drain`), every later step is bounded, exit code 0.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from headswap import metrics
from headswap.admission import Slots, SlotsPerKey
from headswap.api.arrival import RequestArrival
from headswap.api.auth import AuthInterceptor
from headswap.api.drain import DRAIN_EXIT_MARGIN_S, CallsInProgress
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
from headswap.errors import HeadswapError
from headswap.registry.registry import Registry, check_model_name, model_name_for_source
from headswap.security.credentials import CredentialStore
from headswap.thread_pool import ShrinkingThreadPool
from headswap.training.backends import EXPORT_BACKEND
from headswap.workdir import WorkDirBusy, lock_work_dir

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Health for this service name turns SERVING once a warm training worker is ready (the first job
# then starts at once), and NOT_SERVING while none is.
TRAINING_SERVICE = pb.DESCRIPTOR.services_by_name["Training"].full_name

# Start-up waits that can heal say so in the log at least this often.
STARTUP_LOG_INTERVAL_S = 10.0
# Retries of a model store that does not answer: from the first delay, doubling up to the last.
STORE_RETRY_FIRST_S, STORE_RETRY_MAX_S = 0.5, STARTUP_LOG_INTERVAL_S


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

# How long a thread that wants the GIL waits before the holder must let it go (Python's default is
# 5 ms). An inference lane back from ONNX Runtime needs the GIL for a moment to answer its batch
# and take the next; while a request thread runs Python (parsing a body, building an answer) the
# lane's core could sit idle that long. At 1 ms: 1.03-1.05x the images/s at 16 REST clients on 2
# cores, 1.01x at 4 clients and over gRPC (docs/performance.md).
GIL_SWITCH_INTERVAL_S = 0.001


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
        if settings.job_store:  # workers write progress into it; a DSN's password stays out of job files
            os.environ[env_name("job_store")] = settings.job_store
        check_start_files(settings)
        self.registry = Registry(settings.model_dir, cache_dir=Path(settings.work_dir) / "cache",
                                 keep_versions=settings.keep_versions, store_timeout_s=settings.store_timeout_s)
        self.default_model = check_model_name(default_model_name(settings))
        self.health = HealthService(experimental_non_blocking=True)
        self.manager = None
        self.jobs = None
        self.runner = None
        self.ready = threading.Event()
        self.stopping = threading.Event()
        # Set by a signal, or by a start-up failure (then `failure` holds its one-line cause): run()
        # stops the server when it is.
        self.shutdown = threading.Event()
        self.failure: str | None = None
        self._export: subprocess.Popen | None = None
        self.calls = CallsInProgress()
        self.port = 0
        self.metrics_port = 0
        self.http = None  # the REST port's server (api.http_server), when --http-port is not -1
        self.http_port = 0
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
        # The drain's view of the calls in progress comes first: it sees every call, from its start.
        self.server = grpc.server(pool, options=options, maximum_concurrent_rpcs=settings.max_concurrent_calls,
                                  interceptors=[self.calls, self._request_arrival(), interceptor, MalformedRequestInterceptor(),
                                                reflection_limit, self._health_watch_limit()])
        services = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if settings.role in ("all", "inference"):
            services += self._add_inference()
        if settings.role in ("all", "trainer") or settings.job_store:
            services += self._add_training()
        if settings.reflection:
            reflection.enable_server_reflection(services, self.server)

    def _add_inference(self) -> list[str]:
        from headswap.api.inference_servicer import InferenceServicer, ModelsServicer
        from headswap.api.inference_protocol import InferenceProtocol
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
        # One protocol object for gRPC's KServe V2 and the REST app: the same rules, models and bounds.
        self.inference_protocol = InferenceProtocol(classifier, self.registry, self.manager, self.ready, callers)
        kserve_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(self.inference_protocol), self.server)
        if self.settings.http_port >= 0:
            self.http = self._rest_server()
        return [pb.DESCRIPTOR.services_by_name[n].full_name for n in ("Inference", "Models")] + [
            kserve_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name]

    def _rest_server(self):
        """The Open Inference Protocol over REST on --http-port: the same protocol object, credentials,
        TLS files and bounds as the gRPC port (issue 22)."""
        from headswap.api.http_server import HttpLimits, HttpServer
        from headswap.api.rest import RestApp
        from headswap.api.tls import http_ssl_context

        s = self.settings
        app = RestApp(self.inference_protocol, self.credentials, mutual_tls=bool(s.tls_client_ca_file),
                      serving=lambda: self.ready.is_set() and not self.stopping.is_set(),
                      max_message_bytes=s.max_message_bytes, bytes_in_flight=s.max_request_bytes_in_flight,
                      waiting_per_client=s.max_waiting_calls_per_client, max_inference_calls=s.max_inference_calls)
        limits = HttpLimits(max_connections=s.max_connections, arrival_timeout_s=s.request_arrival_timeout_s,
                            max_headers=s.http_max_headers, max_header_bytes=s.http_max_header_bytes)
        return HttpServer(app.app, limits, s.connection_idle_timeout_s, s.handshake_timeout_s, http_ssl_context(s))

    def _add_training(self) -> list[str]:
        from headswap.api.training_servicer import TrainingServicer
        from headswap.training.jobs import JobManager

        s = self.settings
        self.jobs = JobManager(s, self.registry, self.manager)
        if s.role in ("all", "trainer"):
            from headswap.training.runner import JobRunner

            self.runner = self.jobs.runner = JobRunner(s, self.registry, lambda: self.jobs.store, self.manager,
                                                       on_ready=self._trainer_ready, embedded=not s.job_store)
        # Trainers of a fleet only claim and run jobs: callers reach the job store through any serving
        # replica. A lone trainer on its embedded store is the only way in to its jobs, so it serves them.
        if s.role == "trainer" and s.job_store:
            return []
        pb_grpc.add_TrainingServicer_to_server(TrainingServicer(self.jobs), self.server)
        return [pb.DESCRIPTOR.services_by_name["Training"].full_name]

    def _model_ready(self, name: str, ready: bool) -> None:
        self.health.set(name, SERVING if ready else NOT_SERVING)

    def _trainer_ready(self, ready: bool) -> None:
        """A warm training worker became ready, or the ready one went away (a cancel, a crash)."""
        if not self.stopping.is_set():
            self.health.set(TRAINING_SERVICE, SERVING if ready else NOT_SERVING)

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
        if self.http is not None:
            http_host = s.host.strip("[]")  # gRPC's [::] is HTTP's ::
            with _binding("--http-port", f"{http_host}:{s.http_port}"):
                self.http_port = self.http.bind(http_host, s.http_port)
        self.health.set("", NOT_SERVING)
        if self.jobs is not None:
            self.health.set(TRAINING_SERVICE, NOT_SERVING)
        self.server.start()
        if self.http is not None:
            self.http.start()
        log.info("gRPC listening on port %d, metrics on %s, REST on %s", self.port, self.metrics_port or "off",
                 self.http_port or "off")
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
        """Make sure the default model is there and loaded, then report SERVING. What cannot heal
        ends the process (`_fail`); what can is waited for."""
        try:
            self._store_versions()  # the store answers before anything else is done with it
            if self.settings.role in ("all", "trainer"):
                self._remove_abandoned()
            self._ensure_default_model()
            if self.manager is not None:
                while not self._load_default_model():
                    if self.stopping.wait(self.settings.poll_interval_s):
                        return
                self.manager.start_polling()
            if self.jobs is not None:  # beside serving: a job store that is down must not hold up Classify
                threading.Thread(target=self._open_job_store, name="job-store", daemon=True).start()
        except _Stopping:
            return
        except StartupFailed as err:
            self._fail(str(err))
            return
        except Exception as err:  # a bug or an environment problem: the trace, then the one-line cause
            log.exception("start-up failed")
            self._fail(f"start-up failed: {type(err).__name__}: {_one_line(err)}")
            return
        self.ready.set()
        self.health.set("", SERVING)
        log.info("ready: default model %s", self.default_model)

    def _open_job_store(self) -> None:
        """Connect and migrate the job store, retrying while it does not answer (training calls are
        UNAVAILABLE meanwhile, naming it); one that can never work ends the process. Then the
        trainer starts claiming."""
        from headswap.training.databases import StoreMisconfigured, retry_until

        try:
            if not retry_until(self.jobs.connect, "job store", self.stopping, STARTUP_LOG_INTERVAL_S):
                return
        except StoreMisconfigured as err:
            self._fail(str(err))
            return
        if self.runner is not None:
            self.runner.start()
        else:  # a serving replica: training calls are answered from here on
            self.health.set(TRAINING_SERVICE, SERVING)

    def _fail(self, cause: str) -> None:
        """A start-up failure that waiting cannot heal: run() stops the server and exits non-zero."""
        if self.stopping.is_set():  # stopped meanwhile: what failed was cut short, not broken
            return
        self.failure = cause
        log.error("start-up failed, exiting: %s", cause)
        self.shutdown.set()

    def _store_versions(self) -> list[int]:
        """The default model's versions. While the model store does not answer, retry with backoff
        (an S3 endpoint down for a moment at start-up must not leave the server NOT_SERVING for good)."""
        delay, started = STORE_RETRY_FIRST_S, time.monotonic()
        while True:
            try:
                return self.registry.versions(self.default_model)
            except Exception as err:  # noqa: BLE001 - whatever the store library raises, it may heal
                log.warning("model store %s does not answer (%s); retrying in %.1f s (waiting %.0f s so far)",
                            self.registry.url, _one_line(err), delay, time.monotonic() - started)
            if self.stopping.wait(delay):
                raise _Stopping()
            delay = min(delay * 2, STORE_RETRY_MAX_S)

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
        if self._store_versions():
            return
        if self.settings.role == "inference":  # no TensorFlow here: a trainer or `headswap export` seeds it
            started = said = time.monotonic()
            log.info("waiting for model %s to appear in %s", self.default_model, self.registry.url)
            while not self._store_versions():
                if self.stopping.wait(self.settings.poll_interval_s):
                    raise _Stopping()
                if time.monotonic() - said >= STARTUP_LOG_INTERVAL_S:
                    said = time.monotonic()
                    log.info("still waiting for model %s to appear in %s (%.0f s so far; a trainer or "
                             "`headswap export` puts it there)", self.default_model, self.registry.url,
                             said - started)
            return
        self._export_default_model()

    def _export_default_model(self) -> None:
        """`headswap export` in a subprocess (TensorFlow's memory and threads go away with it), on
        TensorFlow whatever KERAS_BACKEND says; its output goes to this log, its last line is the
        cause when it fails."""
        log.info("exporting %s as %s into %s (first start)", self.settings.model, self.default_model,
                 self.registry.url)
        command = [sys.executable, "-m", "headswap.cli", "export", self.settings.model,
                   "--name", self.default_model, "--model-dir", self.settings.model_dir]
        if self.settings.weights:
            command += ["--weights", self.settings.weights]
        env = {**os.environ, "KERAS_BACKEND": EXPORT_BACKEND}
        last: collections.deque[str] = collections.deque(maxlen=1)
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                              text=True, errors="replace") as proc:
            self._export = proc
            if self.stopping.is_set():  # stop() may have looked before _export was set
                proc.terminate()
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stderr.write(line)
                if line.strip():
                    last.append(line.strip())
            code = proc.wait()
        if self.stopping.is_set():
            raise _Stopping()
        if code != 0:
            cause = last[0] if last else "no output"
            raise StartupFailed(f"exporting the default model {self.settings.model} failed (exit code {code}): "
                                f"{cause[:500]}")

    def stop(self, grace_s: float | None = None) -> bool:
        """Drain: NOT_SERVING, refuse new calls, let in-flight ones finish within the grace period;
        end those still running then with UNAVAILABLE. Returns within grace + DRAIN_EXIT_MARGIN_S,
        and makes sure the process is gone by then (`_exit_by`): a handler busy on the CPU, a
        batcher or a worker that does not stop must not keep it alive past the pod's stop timeout.

        grpc's own stop(grace).wait() overran: it cancels calls at the grace, but its event waits
        until every handler has returned, and a handler decoding and classifying 256 images goes on
        until it is done (15 s against a 10 s grace, 16 such calls on 2 cores)."""
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        started = time.monotonic()
        # A trainer's running job may take --trainer-drain-s (role trainer; within the grace in role
        # all) to finish; past it, it is released for another trainer.
        drain_s = self.settings.trainer_drain_s if self.settings.role == "trainer" else min(
            grace, self.settings.trainer_drain_s)
        limit, exit_at = started + grace, started + max(grace, drain_s) + DRAIN_EXIT_MARGIN_S
        _exit_by(exit_at - 0.1, 1 if self.failure else 0, self._failure_line())
        log.info("shutting down: draining for up to %.1fs", grace)
        self.stopping.set()
        self.health.enter_graceful_shutdown()
        if self._export is not None and self._export.poll() is None:
            self._export.terminate()
        # Beside the drain: the trainer stops claiming, its running job finishes or is released (the
        # job store keeps every job; queued ones wait for the next trainer), then the store closes.
        closing = [_in_background(lambda: self._stop_jobs(drain_s), "stop-jobs")] if self.jobs is not None else []
        # Draining: new calls are refused (UNAVAILABLE), those in progress may finish until the limit.
        # grpc's own stop comes after: it would cancel with a bare CANCELLED, its event waits for every
        # handler, and a status sent once its shutdown had begun never reached the client.
        self.calls.refuse_new("the server is shutting down; send the call again (another replica answers)")
        idle = self.calls.wait_idle(limit - time.monotonic())
        if not idle:
            ended = self.calls.end_all(grpc.StatusCode.UNAVAILABLE,
                                       f"the server is shutting down and this call was still running after "
                                       f"--grace-period-s ({grace:g} s); send it again (another replica "
                                       "answers)")
            if ended:
                log.warning("drain limit reached: %d calls still running were ended with UNAVAILABLE", ended)
            # Their handlers notice and return (a handler busy in a batch may not before the exit).
            self.calls.wait_idle(min(0.5, exit_at - 0.4 - time.monotonic()))
        # Every handler has returned, but an answer may still be on its way out, and a call that
        # came in just now may not have reached our handler yet (it is refused there): grpc's stop
        # with the time left lets both end, where stop(0) cancelled them ("Cancelling all calls").
        if self.http is not None:  # REST: stop listening, let its requests finish within what is left
            closing.append(_in_background(lambda: self.http.stop(max(0.0, limit - time.monotonic())), "stop-http"))
        drained = self.server.stop(max(0.0, limit - time.monotonic()) if idle else 0)
        drained.wait(max(0.0, exit_at - 0.4 - time.monotonic()))
        if self.health_server is not None:
            self.health_server.stop(0)
        if self.manager is not None:
            closing.append(_in_background(self.manager.close, "close-models"))
        for thread in closing:
            thread.join(max(0.0, exit_at - 0.3 - time.monotonic()))
        clean = not any(t.is_alive() for t in closing) and not len(self.calls)
        log.info("stopped%s", "" if clean else " (calls ended at the limit are still computing; exiting without them)")
        return clean

    def _stop_jobs(self, drain_s: float) -> None:
        from headswap.training.runner import STOP_GRACE_S

        if self.runner is not None:  # room left to stop the worker and release the job in time
            self.runner.drain(max(0.0, drain_s - STOP_GRACE_S - 1.0))
        self.jobs.close()

    def _failure_line(self) -> str | None:
        return None if self.failure is None else f"headswap: {self.failure}"


class PortUnavailable(RuntimeError):
    """A port the settings name cannot be bound (in use, or not permitted)."""


class StartupFailed(RuntimeError):
    """A start-up failure that waiting cannot heal; the message is its one-line cause."""


class _Stopping(Exception):
    """The server began to stop while starting up: start-up ends quietly."""


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def check_start_files(settings: Settings) -> None:
    """Local paths the settings name that no wait can fix: ValueError naming the setting."""
    model_dir = settings.model_dir.removeprefix("file://")
    if "://" not in model_dir:
        path = Path(model_dir).expanduser()
        if path.exists() and not path.is_dir():
            raise ValueError(f"--model-dir {settings.model_dir} is a file, not a directory: name a directory "
                             "(it is created when missing) or s3://BUCKET/PREFIX")
    if settings.weights and settings.role in ("all", "trainer"):  # exports and jobs read it
        try:
            with open(Path(settings.weights).expanduser(), "rb") as handle:
                handle.read(1)
        except OSError as err:
            raise ValueError(f"--weights {settings.weights} cannot be read: {err.strerror or err}") from None


def _in_background(work: Callable[[], None], name: str) -> threading.Thread:
    """Run a clean-up step on a daemon thread, so that the drain can stop waiting for it."""

    def run_logged() -> None:
        try:
            work()
        except Exception:
            log.exception("%s failed while stopping", name)

    thread = threading.Thread(target=run_logged, name=name, daemon=True)
    thread.start()
    return thread


def _exit_by(when: float, code: int, message: str | None) -> None:
    """End the process at `when` (monotonic) if it is still there: after the drain, what is left
    (an executor's atexit join over queued decodes, a handler busy on the CPU) must not outlast the
    limit."""

    def watchdog() -> None:
        time.sleep(max(0.0, when - time.monotonic()))
        log.warning("exiting now: the drain limit has passed (work still running is abandoned)")
        _exit_now(code, message)

    threading.Thread(target=watchdog, name="exit-watchdog", daemon=True).start()


def _exit_now(code: int, message: str | None = None) -> None:
    """Exit without the interpreter's teardown: with handler threads still inside ONNX Runtime,
    finalizing the interpreter under them aborted the process (SIGABRT, "terminate called without
    an active exception") instead of exiting 0."""
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    with contextlib.suppress(Exception):
        if message:
            sys.stderr.write(message + "\n")
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


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
    """Serve until SIGTERM or SIGINT, then drain and return (exit code 0). A process stuck hard
    enough to be killed with SIGABRT (or crashing in native code) writes every thread's Python
    stack to its log first (faulthandler), for whoever has to find out why."""
    import faulthandler

    faulthandler.enable()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    from headswap.inference.memory import limit_malloc_arenas

    limit_malloc_arenas()  # before any thread starts: resident memory stays flat across swaps
    try:
        server = HeadswapServer(settings)
    except (ValueError, WorkDirBusy, HeadswapError) as err:  # unusable files, a taken work dir: no traceback
        raise SystemExit(f"headswap: {_one_line(err)}") from None
    except OSError as err:  # a directory that cannot be created, ...
        raise SystemExit(f"headswap: cannot start: {_one_line(err)}") from None
    try:
        server.start()
    except PortUnavailable as err:
        raise SystemExit(f"headswap: {err}") from None

    def on_signal(signum, frame) -> None:
        server.shutdown.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.shutdown.wait()
    failure = server._failure_line()
    clean = server.stop(grace_s=None if failure is None else 0.0)  # a failed start served nothing to wait for
    if not clean:
        _exit_now(0 if failure is None else 1, failure)
    if failure is not None:
        raise SystemExit(failure)
