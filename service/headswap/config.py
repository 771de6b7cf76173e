"""The one place for configuration: every setting, its flag, its environment variable, its default.

Each `Setting` becomes a `headswap serve` flag (`--port`) and an environment variable with the
`HEADSWAP_` prefix (`HEADSWAP_PORT`); flags win over the environment. `Settings.validate()` runs
once at start, and `Settings.describe()` is what the server logs once.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "HEADSWAP_"
ROLES = ("all", "inference", "trainer")
DEFAULT_MODEL_SOURCE = "builtin:efficientnet-lite0"
AUTO_LANES = 4  # inference lanes by default: one per thread, but each lane holds a copy of the model


def _setting(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class Settings:
    """Server settings. Field names map to `--flag-name` and `HEADSWAP_FIELD_NAME`."""

    role: str = _setting("all", "Which part runs: all (one process), inference, or trainer.", choices=ROLES)
    host: str = _setting("0.0.0.0", "Address the gRPC server binds to.")
    port: int = _setting(50051, "gRPC port (headswap.v1, KServe V2, health, reflection). 0 picks a free port.")
    metrics_port: int = _setting(9090, "Prometheus /metrics HTTP port; -1 disables it, 0 picks a free port.")
    model_dir: str = _setting("models", "Model registry: a local directory, file://PATH, or s3://BUCKET/PREFIX.")
    s3_endpoint_url: str = _setting("", "S3-compatible endpoint for s3:// model dirs (MinIO, ...); "
                                     "credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.")
    store_timeout_s: float = _setting(10.0, "Longest one model-store call may take (a listing, a read, an "
                                      "active.json update; a download or upload gets this plus 1 s per MiB) "
                                      "before it is answered UNAVAILABLE naming the store.")
    model: str = _setting(DEFAULT_MODEL_SOURCE, "Default model source: builtin:NAME, keras:APP, or hub:HANDLE.")
    model_name: str = _setting("", "Registry name of the default model (default: derived from --model).")
    weights: str = _setting("", "Local weights file for a keras: default model (default: Keras' download).")
    work_dir: str = _setting(".headswap", "Local scratch directory: job database, uploaded training data.")
    threads: int = _setting(0, "ONNX Runtime intra-op threads per model (0 = number of CPUs).")
    max_message_bytes: int = _setting(16 * 1024 * 1024, "Largest gRPC message accepted, in bytes (a KServe UINT8 "
                                      "batch of 111 images at 224x224; 256 JPEGs of 64 KB).")
    max_image_pixels: int = _setting(40_000_000, "Largest decoded image (width*height) accepted.")
    max_images_per_request: int = _setting(256, "Most images in one Classify request.")
    max_batch_size: int = _setting(8, "Dynamic batching: most images in one ONNX Runtime call. Lanes take "
                                   "batches of the size (1, 2, 4 ... this) that measures cheapest per image.")
    batch_timeout_ms: float = _setting(1.0, "Dynamic batching: longest a request waits for others to join.")
    max_queue: int = _setting(512, "Dynamic batching: most queued images per model before RESOURCE_EXHAUSTED.")
    decode_workers: int = _setting(0, "Threads decoding images in parallel with inference (0 = number of CPUs).")
    poll_interval_s: float = _setting(2.0, "How often the registry is polled for changed active versions.")
    max_loaded_models: int = _setting(4, "Most model versions kept resident; least recently used unloaded first.")
    memory_budget_mb: int = _setting(0, "Resident size budget for loaded models in MiB (0 = no budget).")
    grace_period_s: float = _setting(10.0, "On SIGTERM: how long in-flight requests may take to finish.")
    max_train_images: int = _setting(50_000, "FineTune: most images in one job.")
    max_train_bytes: int = _setting(2 * 1024**3, "FineTune: most encoded image bytes in one job.")
    max_label_length: int = _setting(64, "FineTune: longest class label, in characters.")
    log_format: str = _setting("text", "Log format: text or json (one JSON object per line).", choices=("text", "json"))
    log_level: str = _setting("INFO", "Log level.", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    log_refusals_per_minute: int = _setting(60, "Most log lines a minute for each kind of refused or failed "
                                            "call (same method and status, audit lines too); the rest are "
                                            "counted in one line.")

    # --- bounds on what callers control (issue 8) ---
    max_request_pixels: int = _setting(120_000_000, "Most decoded pixels (sum of width*height) in one request.")
    max_inference_calls: int = _setting(128, "Most inference calls handled at once; more get RESOURCE_EXHAUSTED.")
    max_inference_calls_per_caller: int = _setting(64, "Most inference calls one caller has in progress at once "
                                                   "(a credential; without authentication, a client address), "
                                                   "so one caller cannot take every --max-inference-calls slot.")
    max_uploads: int = _setting(4, "FineTune: most uploads streaming at once; more get RESOURCE_EXHAUSTED.")
    upload_idle_timeout_s: float = _setting(30.0, "FineTune: an upload that sends nothing for this long is ended.")
    max_upload_seconds: float = _setting(3600.0, "FineTune: longest one upload stream may stay open.")
    max_watchers: int = _setting(32, "WatchJob: most streams open at once; more get RESOURCE_EXHAUSTED.")
    max_reflection_streams: int = _setting(8, "gRPC reflection: most streams open at once (each holds a "
                                           "thread); more get RESOURCE_EXHAUSTED.")
    max_connections: int = _setting(4096, "Most client connections open at once on the gRPC port; more are "
                                    "refused until one closes (open ones keep working).")
    handshake_timeout_s: float = _setting(10.0, "A connection that has not finished its HTTP/2 (and TLS) "
                                          "handshake this long after opening is closed.")
    connection_idle_timeout_s: float = _setting(300.0, "A connection with no call open for this long is closed "
                                                "(clients reconnect on their next call).")
    max_connection_age_s: float = _setting(300.0, "A connection is asked to close this long after it opened "
                                           "(clients reconnect, and find a Service's new replicas).")
    connection_age_grace_s: float = _setting(60.0, "After --max-connection-age-s, how long its calls may go on "
                                             "(WatchJob and reflection streams too) before it is closed.")
    max_health_watchers: int = _setting(32, "grpc.health.v1 Watch: most streams open at once on each port; more "
                                        "get RESOURCE_EXHAUSTED.")
    max_concurrent_calls: int = _setting(1024, "Most calls open at once on the gRPC port; more get RESOURCE_EXHAUSTED. "
                                         "Each has a thread, so calls waiting on slow callers never hold up others.")
    idle_thread_timeout_s: float = _setting(60.0, "A gRPC handler thread that has waited this long for a call "
                                            "exits (threads start again as calls need them).")
    request_arrival_timeout_s: float = _setting(30.0, "A call whose request message has not arrived this long "
                                                "after its headers is ended with DEADLINE_EXCEEDED.")
    max_resets_per_connection: int = _setting(1000, "Rapid reset (CVE-2023-44487): a connection that resets this "
                                              "many calls before their request arrives, within 10 s and 10 times "
                                              "more than it completes, is sent GOAWAY and closed (0 = never).")
    max_waiting_calls_per_client: int = _setting(16, "Most calls from one client address still waiting for "
                                                 "their request message; more get RESOURCE_EXHAUSTED.")
    max_request_bytes_in_flight: int = _setting(256 * 1024 * 1024, "Most bytes of request messages being handled "
                                                "at once (received, not yet answered); a request that would pass it "
                                                "gets RESOURCE_EXHAUSTED.")
    max_queued_jobs: int = _setting(8, "FineTune: most jobs queued or running; more get RESOURCE_EXHAUSTED.")
    max_work_dir_bytes: int = _setting(20 * 1024**3, "FineTune: most bytes of uploads being received into this "
                                       "replica's work directory at once (each is then staged in the model store).")

    # --- the training fleet (issue 20) ---
    job_store: str = _setting("", "Where fine-tune jobs live: empty = an SQLite file in the work directory (one "
                              "process); postgresql://USER@HOST:PORT/DB = a database shared by every replica and "
                              "trainer (the password from PGPASSWORD or a Secret, never logged).", secret=True)
    job_store_timeout_s: float = _setting(5.0, "Longest a job-store call (connect, query) may take before the call "
                                          "is answered UNAVAILABLE naming the store.")
    job_lease_s: float = _setting(30.0, "A trainer renews its claim on a running job this often at least; a job "
                                  "whose trainer stopped renewing (killed, node lost) is claimed again after it.")
    max_job_attempts: int = _setting(2, "A job whose trainer was lost this many times is FAILED, with the reason.")
    trainer_drain_s: float = _setting(300.0, "On SIGTERM a trainer (role trainer) stops claiming and lets its job "
                                      "finish this long, then releases it for another trainer at once (role all: "
                                      "at most --grace-period-s).")
    keep_failed_job_data_s: float = _setting(86400.0, "A failed job's staged upload is kept this long (to look at "
                                             "it or send the job again); others' are removed when they end.")
    max_queued_jobs_per_submitter: int = _setting(4, "FineTune: most jobs one submitter (a credential) has queued "
                                                  "or running; more get RESOURCE_EXHAUSTED.")
    max_staged_bytes: int = _setting(20 * 1024**3, "FineTune: most bytes of uploads staged in the model store for "
                                     "jobs not yet ended (and failed jobs' kept data).")
    keep_versions: int = _setting(5, "Retention: newest inactive versions kept per model (never the active "
                                     "one or its rollback target); 0 keeps all.")
    abandoned_after_s: float = _setting(3600.0, "Start-up clean-up: an unfinished staged version older than "
                                        "this is abandoned and removed.")

    # --- access control (issue 9) ---
    tls_cert_file: str = _setting("", "TLS certificate chain (PEM) for the gRPC port; reloaded when it changes.")
    tls_key_file: str = _setting("", "TLS private key (PEM) for --tls-cert-file.")
    tls_client_ca_file: str = _setting("", "Mutual TLS: CA bundle (PEM) that client certificates must chain to.")
    auth_tokens_file: str = _setting("", "JSON list of credentials {name, token_sha256 | client_identity, "
                                     "scopes}; empty = no authentication (development only).")
    reflection: bool = _setting(True, "Serve gRPC reflection (grpcurl list/describe).")
    metrics_host: str = _setting("", "Address the metrics port binds to (default: --host).")
    metrics_tls_cert_file: str = _setting("", "TLS certificate (PEM) for the metrics port.")
    metrics_tls_key_file: str = _setting("", "TLS private key (PEM) for the metrics port.")
    metrics_max_connections: int = _setting(16, "Metrics port: most connections served at once; more are "
                                            "closed on arrival.")
    metrics_timeout_s: float = _setting(10.0, "Metrics port: a connection is closed this long after it opened "
                                        "(TLS handshake included), whatever it sends.")
    health_port: int = _setting(-1, "Plaintext port serving only grpc.health.v1 (for probes that cannot do "
                                "TLS, like the kubelet's gRPC probe); -1 disables it, 0 picks a free port.")

    # --- REST: the Open Inference Protocol over HTTP (issue 22) ---
    http_port: int = _setting(8080, "Open Inference Protocol REST port (KServe V2 / Triton HTTP endpoints, /v2/...), "
                              "served beside gRPC by the same process and models, with the same TLS, tokens and "
                              "bounds; -1 disables it, 0 picks a free port.")
    http_max_header_bytes: int = _setting(32768, "REST: most bytes of one request's request line and headers; "
                                          "more get 431 and the connection is closed.")
    http_max_headers: int = _setting(100, "REST: most header fields in one request; more get 431 and the connection "
                                     "is closed.")

    # --- serving speed (issue 10) ---
    intra_op_spinning: str = _setting(
        "adaptive", "ONNX Runtime intra-op threads between ops: adaptive (a request running alone uses "
        "spinning threads when that measures faster here; concurrent load never does), "
        "on, or off.",
        choices=("adaptive", "on", "off"))
    inference_lanes: int = _setting(
        0, "ONNX Runtime sessions per model that run batches side by side, the threads split between them "
        "(0 = one per thread, at most 4). On 2 cores two 1-thread sessions ran up to 1.37x the images/s of "
        "one 2-thread session (small batches); a request running alone still gets every thread.")

    # --- fine-tune speed (issue 11) ---
    embedding_cache_mb: int = _setting(1024, "FineTune: size of the content-addressed embedding cache in MiB "
                                       "(0 disables it).")

    # --- the trainer (issue 24) ---
    trainer_backend: str = _setting(
        "auto", "Keras backend of the training workers: auto (JAX for head-only jobs where it is installed, "
        "2-3x faster per job here; TensorFlow for phase 2), jax, or tensorflow. Each worker process sets its "
        "own; KERAS_BACKEND is ignored, and exports always run on TensorFlow (tf2onnx).",
        choices=("auto", "jax", "tensorflow"))
    trainer_warm_start: bool = _setting(
        True, "Start the warm training worker (Keras and its backend: about 5 s of CPU and 0.4 GB) when the "
        "server starts, so that the first FineTune does not wait for it; false: when the first FineTune "
        "arrives. Health for headswap.v1.Training turns SERVING once it is ready.")

    # --- safe rollouts (issue 21) ---
    rollout_min_requests: int = _setting(200, "Rollouts: answers the candidate must give in a replica before "
                                         "that replica decides to promote or roll it back.")
    rollout_error_margin: float = _setting(0.02, "Rollouts: the candidate's error rate may exceed the stable "
                                           "version's by at most this (0..1) to be promoted.")
    rollout_p99_factor: float = _setting(1.5, "Rollouts: the candidate's p99 latency may be at most this many "
                                         "times the stable version's to be promoted.")
    rollout_agreement_floor: float = _setting(0.9, "Rollouts, shadow mode: least share (0..1) of images on which "
                                              "the candidate's top-1 matches the stable version's to be promoted.")
    rollout_shadow_queue: int = _setting(16, "Rollouts, shadow mode: most mirrored requests waiting for the "
                                         "candidate; more are dropped and counted.")
    rollout_shadow_cpu_share: float = _setting(
        0.1, "Rollouts, shadow mode: most share (0..1] of one core's time the candidate's shadow runs may take; "
        "the shadow thread rests in between, its queue fills and further mirrors are dropped and counted, so "
        "that stable answers keep the CPU and memory bandwidth they need.")

    # --- ranking images for labelling (issue 23) ---
    max_rank_top: int = _setting(256, "RankForLabelling: most images one call may ask for (its `top`).")
    max_ranking_calls: int = _setting(2, "RankForLabelling: most calls running at once (each runs its images "
                                      "on the model's own session, beside Classify's batcher); more get "
                                      "RESOURCE_EXHAUSTED.")

    def validate(self) -> "Settings":
        """Refuse impossible values at start, with a message naming the setting."""
        problems: list[str] = []
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                problems.append(f"{flag_name(f.name)} must be one of {', '.join(choices)}")
        if not 0 <= self.port <= 65535:
            problems.append("--port must be between 0 and 65535")
        if not -1 <= self.metrics_port <= 65535:
            problems.append("--metrics-port must be between -1 and 65535")
        if not -1 <= self.health_port <= 65535:
            problems.append("--health-port must be between -1 and 65535")
        if not -1 <= self.http_port <= 65535:
            problems.append("--http-port must be between -1 and 65535")
        for name in ("max_message_bytes", "max_image_pixels", "max_images_per_request", "max_batch_size",
                     "max_queue", "max_loaded_models", "max_train_images", "max_train_bytes", "max_label_length",
                     "max_request_pixels", "max_inference_calls", "max_inference_calls_per_caller", "max_uploads",
                     "max_watchers", "max_reflection_streams", "max_health_watchers", "max_concurrent_calls",
                     "max_connections", "max_waiting_calls_per_client", "max_request_bytes_in_flight",
                     "log_refusals_per_minute", "max_queued_jobs", "max_work_dir_bytes", "metrics_max_connections",
                     "max_job_attempts", "max_queued_jobs_per_submitter", "max_staged_bytes",
                     "http_max_header_bytes", "http_max_headers", "max_rank_top", "max_ranking_calls"):
            if getattr(self, name) < 1:
                problems.append(f"{flag_name(name)} must be at least 1")
        for name in ("threads", "decode_workers", "memory_budget_mb", "inference_lanes"):
            if getattr(self, name) < 0:
                problems.append(f"{flag_name(name)} must not be negative")
        for name in ("batch_timeout_ms", "grace_period_s", "keep_versions", "embedding_cache_mb", "trainer_drain_s",
                     "keep_failed_job_data_s"):
            if getattr(self, name) < 0:
                problems.append(f"{flag_name(name)} must not be negative")
        for name in ("upload_idle_timeout_s", "max_upload_seconds", "abandoned_after_s", "metrics_timeout_s",
                     "store_timeout_s",
                     "request_arrival_timeout_s", "handshake_timeout_s", "connection_idle_timeout_s",
                     "max_connection_age_s", "connection_age_grace_s", "idle_thread_timeout_s",
                     "job_store_timeout_s", "job_lease_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{flag_name(name)} must be positive")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            problems.append("--tls-cert-file and --tls-key-file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            problems.append("--tls-client-ca-file needs --tls-cert-file and --tls-key-file")
        if bool(self.metrics_tls_cert_file) != bool(self.metrics_tls_key_file):
            problems.append("--metrics-tls-cert-file and --metrics-tls-key-file go together")
        held = (self.max_inference_calls + self.max_uploads + self.max_watchers + self.max_reflection_streams
                + self.max_health_watchers + self.max_waiting_calls_per_client)
        if self.max_concurrent_calls <= held:
            problems.append(f"--max-concurrent-calls must exceed the calls the other limits let one client hold "
                            f"({held}: --max-inference-calls, --max-uploads, --max-watchers, "
                            f"--max-reflection-streams, --max-health-watchers, --max-waiting-calls-per-client), "
                            "or one client could have health checks refused")
        if self.max_request_bytes_in_flight < self.max_message_bytes:
            problems.append("--max-request-bytes-in-flight must be at least --max-message-bytes, or the largest "
                            "request allowed could never be handled")
        if self.rollout_min_requests < 1 or self.rollout_shadow_queue < 1:
            problems.append("--rollout-min-requests and --rollout-shadow-queue must be at least 1")
        if not 0 <= self.rollout_error_margin <= 1 or not 0 <= self.rollout_agreement_floor <= 1:
            problems.append("--rollout-error-margin and --rollout-agreement-floor must be between 0 and 1")
        if not 0 < self.rollout_shadow_cpu_share <= 1:
            problems.append("--rollout-shadow-cpu-share must be above 0 and at most 1")
        if self.rollout_p99_factor < 1:
            problems.append("--rollout-p99-factor must be at least 1")
        if self.poll_interval_s <= 0:
            problems.append("--poll-interval-s must be positive")
        if not self.model_dir:
            problems.append("--model-dir must not be empty")
        if problems:
            raise ValueError("invalid configuration: " + "; ".join(problems))
        return self

    @property
    def cpu_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    @property
    def lanes(self) -> int:
        """Side-by-side sessions per model: `inference_lanes`, or one per thread up to AUTO_LANES."""
        return max(1, min(self.inference_lanes or AUTO_LANES, self.cpu_threads))

    @property
    def decode_threads(self) -> int:
        return self.decode_workers or os.cpu_count() or 1

    def describe(self) -> dict[str, Any]:
        """The settings as logged at start: a secret (a DSN's password) is shown without it."""
        values = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.metadata.get("secret") and values[f.name]:
                values[f.name] = redact_url(values[f.name])
        return values

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> "Settings":
        """Settings from HEADSWAP_* variables, then explicit overrides (e.g. parsed flags)."""
        environ = dict(os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def field_type(f: dataclasses.Field) -> type:
    return f.type if isinstance(f.type, type) else TYPES[str(f.type)]


def _parse(f: dataclasses.Field, raw: str) -> Any:
    kind = field_type(f)
    if kind is bool:
        if raw.strip().lower() in TRUE + FALSE:
            return raw.strip().lower() in TRUE
        raise ValueError(f"{env_name(f.name)}={raw!r} is not a valid boolean (true/false)")
    try:
        return kind(raw)
    except ValueError as err:
        raise ValueError(f"{env_name(f.name)}={raw!r} is not a valid {kind.__name__}") from err


def reference_table() -> str:
    """Markdown table of every setting, the heart of docs/configuration.md."""
    rows = ["| flag | environment variable | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(Settings):
        rows.append(f"| `{flag_name(f.name)}` | `{env_name(f.name)}` | `{f.default}` | {f.metadata['help']} |")
    return "\n".join(rows)


REFERENCE_DOC = "docs/configuration.md"


def reference_document() -> str:
    """docs/configuration.md, whole. tests/test_registry.py fails when the file differs from it."""
    return f"""# Configuration reference

Generated from `service/headswap/config.py`, the one place settings are defined: do not edit it by
hand. Regenerate it after changing a setting with

```bash
.venv/bin/python -m headswap.config > {REFERENCE_DOC}
```

(`tests/test_registry.py` fails while this file and `config.py` disagree.)

Every `headswap serve` setting is a flag and an environment variable with the `{ENV_PREFIX}` prefix;
a flag wins over its variable. Values are checked once at start (an impossible one stops the server
with a message naming the setting), and the server logs the settings it runs with once.
The bounds a caller can meet, and the status each gives, are gathered in [limits.md](limits.md).

{reference_table()}

Object storage credentials come from the usual `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` /
`AWS_DEFAULT_REGION` variables.
"""


if __name__ == "__main__":  # python -m headswap.config > docs/configuration.md
    print(reference_document(), end="")


def redact_url(url: str) -> str:
    """A URL or DSN without its password: postgresql://user:pw@host/db -> postgresql://user:***@host/db;
    key=value DSNs lose their password=... pair."""
    import re

    url = re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)
    return re.sub(r"(password\s*=\s*)\S+", r"\1***", url, flags=re.I)
