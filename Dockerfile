# headswap container images: one Dockerfile, one target per role.
#
#   docker build --target inference   -t headswap/inference .     # CPU serving: ONNX Runtime, no TensorFlow
#   docker build --target trainer     -t headswap/trainer .       # Keras on JAX and TensorFlow, CPU (also `serve --role all`)
#   docker build --target trainer-gpu -t headswap/trainer-gpu .   # the same with their CUDA pip packages
#
# Trainer images carry both Keras backends: head-only fine-tunes run on JAX, phase 2 and exports on
# TensorFlow (--trainer-backend auto); each worker process picks its own, whatever KERAS_BACKEND says.
#
# Stages: `builder` turns the source into a wheel (the build generates the protobuf code from
# protos/); each `venv-*` stage installs that wheel with the extras its role needs into
# /opt/venv; the final stages copy only /opt/venv onto a clean base, so no build tool, wheel
# or pip cache ends up in an image.
#
# All three final images: non-root user 10001, ENTRYPOINT `headswap` in exec form (the Python
# server is PID 1 and installs its own SIGTERM/SIGINT handlers: health turns NOT_SERVING,
# in-flight calls finish within --grace-period-s, exit 0), HEALTHCHECK via `headswap health`.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: source -> wheel ---------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
# Only what the build reads; .dockerignore keeps the rest (venvs, models, tests) out of the context.
COPY pyproject.toml setup.py README.md ./
COPY protos/ protos/
COPY service/ service/
# --no-deps: just headswap itself; the venv stages resolve its dependencies.
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- venv stages: the wheel plus the extras of one role, in /opt/venv ----------------------
# The venv is made without pip and filled by the base image's pip (`pip --python`), so the
# final images carry no pip of their own.
FROM ${PYTHON_IMAGE} AS venv-inference
# Serving only: base dependencies (onnxruntime, numpy, Pillow, grpcio...) + object storage +
# OpenVINO, which serves the bf16/int8 precision tiers (`--build-arg INFERENCE_EXTRAS=s3` leaves it
# out: such versions are then refused, and fp32 ones served).
# `postgresql` (psycopg): serving replicas accept fine-tune jobs into a shared PostgreSQL job store
# (--job-store; docs/deploy.md "Training fleet").
# tests/test_deploy.py checks that these never include TensorFlow, Keras or tf2onnx.
ARG INFERENCE_EXTRAS=s3,openvino,postgresql
COPY --from=builder /wheels /wheels
# (The wheel is built above; its dependencies are pinned in pyproject.toml.)
RUN python -m venv --without-pip /opt/venv \
 && set -- /wheels/headswap-*.whl \
 && python -m pip --python /opt/venv/bin/python install --no-cache-dir --disable-pip-version-check \
      "$1[${INFERENCE_EXTRAS}]"

FROM ${PYTHON_IMAGE} AS venv-trainer
# train: TensorFlow and JAX (CPU wheels). openvino: a FineTune with precision bf16/int8 measures its tier in the runtime that serves it.
ARG TRAINER_EXTRAS=train,s3,openvino,postgresql
COPY --from=builder /wheels /wheels
RUN python -m venv --without-pip /opt/venv \
 && set -- /wheels/headswap-*.whl \
 && python -m pip --python /opt/venv/bin/python install --no-cache-dir --disable-pip-version-check \
      "$1[${TRAINER_EXTRAS}]"

FROM ${PYTHON_IMAGE} AS venv-trainer-gpu
ARG TRAINER_EXTRAS=train,s3,openvino,postgresql
# The GPU side of both Keras backends (docs/training.md): JAX's CUDA wheels (`jax[cuda12]`: head-only
# fine-tunes) and TensorFlow's (`tensorflow[and-cuda]`: phase 2), which share one set of nvidia-*
# pip packages (cuDNN, cuBLAS...). No CUDA base image is needed, only the NVIDIA driver of the host
# (the device plugin / container toolkit mounts it). The versions are the `train` extra's pins.
ARG TENSORFLOW_VERSION=2.21.0
ARG JAX_VERSION=0.10.2
COPY --from=builder /wheels /wheels
RUN python -m venv --without-pip /opt/venv \
 && set -- /wheels/headswap-*.whl \
 && python -m pip --python /opt/venv/bin/python install --no-cache-dir --disable-pip-version-check \
      "$1[${TRAINER_EXTRAS}]" "jax[cuda12]==${JAX_VERSION}" "tensorflow[and-cuda]==${TENSORFLOW_VERSION}"

# --- runtime: what every final image shares ------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only in Kubernetes (pip already compiled
# the venv's bytecode at install time). HOME=/tmp: under `docker run --read-only` (and in the
# manifests) only /tmp is writable, and ONNX Runtime, OpenVINO, Keras and JAX write caches under $HOME.
ENV PATH="/opt/venv/bin:${PATH}" \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HEADSWAP_MODEL_DIR=/models \
    HEADSWAP_WORK_DIR=/tmp/headswap
# A numeric USER lets Kubernetes' runAsNonRoot verify the user without reading /etc/passwd.
# /models belongs to the user so that a fresh named volume mounted there is writable.
RUN groupadd --system --gid 10001 headswap \
 && useradd --system --uid 10001 --gid headswap --home-dir /home/headswap --create-home \
      --shell /usr/sbin/nologin headswap \
 && install -d -o headswap -g headswap /models /tmp/headswap
WORKDIR /home/headswap
USER 10001:10001
# 50051: gRPC (headswap.v1, KServe V2, grpc.health.v1, reflection); 8080: the Open Inference Protocol over
# REST (--http-port, inference roles); 9090: Prometheus /metrics.
EXPOSE 50051 8080 9090
# Exec form: no shell needed. `--local` reads the container's HEADSWAP_* settings: it checks the
# plaintext HEADSWAP_HEALTH_PORT when set (needed once TLS is on), else HEADSWAP_PORT.
# Kubernetes ignores this and uses its own gRPC probes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["headswap", "health", "--local", "--timeout", "3"]
ENTRYPOINT ["headswap"]

# --- final images --------------------------------------------------------------------------
FROM runtime AS trainer
COPY --from=venv-trainer /opt/venv /opt/venv
CMD ["serve", "--role", "trainer"]

FROM runtime AS trainer-gpu
# Honoured by the NVIDIA container toolkit (`docker run --gpus all`); Kubernetes' device
# plugin sets the devices itself.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=venv-trainer-gpu /opt/venv /opt/venv
CMD ["serve", "--role", "trainer"]

# Last, so that a plain `docker build .` gives the small serving image.
FROM runtime AS inference
COPY --from=venv-inference /opt/venv /opt/venv
CMD ["serve", "--role", "inference"]
