# headswap container images: one Dockerfile, one target per role.
#
#   docker build --target inference   -t headswap/inference .     # CPU serving: ONNX Runtime, no TensorFlow
#   docker build --target trainer     -t headswap/trainer .       # TensorFlow/Keras on CPU (also `serve --role all`)
#   docker build --target trainer-gpu -t headswap/trainer-gpu .   # TensorFlow with its CUDA pip packages
#   docker build --target trainer-gpu --build-arg GPU_BACKEND=jax -t headswap/trainer-gpu-jax .
#                                                                 # JAX with its CUDA wheels, KERAS_BACKEND=jax
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
# tests/test_deploy.py checks that these never include TensorFlow, Keras or tf2onnx.
ARG INFERENCE_EXTRAS=s3,openvino
COPY --from=builder /wheels /wheels
# (The wheel is built above; its dependencies are pinned in pyproject.toml.)
RUN python -m venv --without-pip /opt/venv \
 && set -- /wheels/headswap-*.whl \
 && python -m pip --python /opt/venv/bin/python install --no-cache-dir --disable-pip-version-check \
      "$1[${INFERENCE_EXTRAS}]"

FROM ${PYTHON_IMAGE} AS venv-trainer
# openvino: a FineTune with precision bf16/int8 measures its tier in the runtime that serves it.
ARG TRAINER_EXTRAS=train,s3,openvino
COPY --from=builder /wheels /wheels
RUN python -m venv --without-pip /opt/venv \
 && set -- /wheels/headswap-*.whl \
 && python -m pip --python /opt/venv/bin/python install --no-cache-dir --disable-pip-version-check \
      "$1[${TRAINER_EXTRAS}]"

FROM ${PYTHON_IMAGE} AS venv-trainer-gpu
ARG TRAINER_EXTRAS=train,s3,openvino
# The GPU side of the trainer, either backend (docs/training.md):
# - GPU_BACKEND=tensorflow (default): TensorFlow's CUDA runtime, cuDNN, cuBLAS... as nvidia-* pip
#   packages (`tensorflow[and-cuda]`);
# - GPU_BACKEND=jax: JAX with its CUDA wheels (`jax[cuda12]`, the same nvidia-* packages); the
#   trainer's head-only path then never imports TensorFlow (phase 2 still exports with tf2onnx,
#   from the CPU TensorFlow of the `train` extra).
# Either way no CUDA base image is needed, only the NVIDIA driver of the host (the device plugin /
# container toolkit mounts it).
ARG GPU_BACKEND=tensorflow
ARG TENSORFLOW_VERSION=2.21.0
ARG JAX_VERSION=0.10.2
COPY --from=builder /wheels /wheels
RUN python -m venv --without-pip /opt/venv \
 && set -- /wheels/headswap-*.whl \
 && if [ "${GPU_BACKEND}" = "jax" ]; then gpu="jax[cuda12]==${JAX_VERSION}"; \
    else gpu="tensorflow[and-cuda]==${TENSORFLOW_VERSION}"; fi \
 && python -m pip --python /opt/venv/bin/python install --no-cache-dir --disable-pip-version-check \
      "$1[${TRAINER_EXTRAS}]" "${gpu}"

# --- runtime: what every final image shares ------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only in Kubernetes (pip already compiled
# the venv's bytecode at install time).
ENV PATH="/opt/venv/bin:${PATH}" \
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
# 50051: gRPC (headswap.v1, KServe V2, grpc.health.v1, reflection); 9090: Prometheus /metrics.
EXPOSE 50051 9090
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
# plugin sets the devices itself. KERAS_BACKEND follows the backend installed above.
ARG GPU_BACKEND=tensorflow
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    KERAS_BACKEND=${GPU_BACKEND}
COPY --from=venv-trainer-gpu /opt/venv /opt/venv
CMD ["serve", "--role", "trainer"]

# Last, so that a plain `docker build .` gives the small serving image.
FROM runtime AS inference
COPY --from=venv-inference /opt/venv /opt/venv
CMD ["serve", "--role", "inference"]
