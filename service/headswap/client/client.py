"""`Client`: the headswap.v1 API as Python calls, for the services that call headswap.

Every method answers plain Python objects (`Prediction`, `Job`, `ModelInfo`) and raises a typed
`ClientError` subclass carrying the gRPC status and the server's message. The CLI is built on it.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, TypedDict, Unpack

import grpc

from headswap.client.connection import Connection, channel
from headswap.client.errors import UnavailableError, from_rpc_error
from headswap.client.images import Example, ImageLike, encode, examples_of, is_single_image
from headswap.client.results import (Classifications, ImagePredictions, Job, JobEvent, JobState, ModelInfo,
                                     RankedImage, Ranking, RolloutStatus, Submission)
from headswap.protocol import headswap_v1_pb2 as pb
from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc

# A FineTune upload is sent in batches of at most this many images or bytes (the server's
# per-message limit is far above; smaller batches keep the upload's memory flat on both sides).
BATCH_IMAGES = 64
BATCH_BYTES = 8 * 1024 * 1024
# rank_for_labelling sends at most this many images a call (the server's default limit is 256).
RANK_BATCH_IMAGES = 128


class FineTuneOptions(TypedDict, total=False):
    """The FineTuneConfig fields of protos/headswap/protocol/headswap_v1.proto besides `name`;
    unset (or None) means the server's default. The client's one default of its own: activate=True."""

    base_model: str
    epochs: int
    learning_rate: float
    batch_size: int
    dropout: float
    validation_split: float
    balance_classes: bool
    class_weights: Mapping[str, float]
    early_stopping_patience: int
    seed: int
    unfreeze_top_layers: int
    finetune_epochs: int
    finetune_learning_rate: float
    activate: bool
    min_val_accuracy: float
    skip_invalid_images: bool
    label_smoothing: float
    precision: Literal["fp32", "bf16", "int8"]
    hidden_units: int
    rollout_mode: Literal["", "canary", "shadow"]
    rollout_percent: int


FINETUNE_OPTIONS: tuple[str, ...] = tuple(f.name for f in pb.FineTuneConfig.DESCRIPTOR.fields if f.name != "name")
# A new model should answer once trained, as the CLI's `finetune` does (the protobuf default is False).
CLIENT_DEFAULTS: dict[str, Any] = {"activate": True}

FineTuneData = str | os.PathLike[str] | Iterable[tuple[ImageLike, Any]]


def finetune_config(name: str, options: Mapping[str, Any]) -> pb.FineTuneConfig:
    """The FineTuneConfig message; unknown options are refused here, naming the valid ones."""
    unknown = sorted(set(options) - set(FINETUNE_OPTIONS))
    if unknown:
        raise TypeError(f"unknown fine-tune option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                        f"valid options: {', '.join(FINETUNE_OPTIONS)}")
    values = {**CLIENT_DEFAULTS, **{k: v for k, v in options.items() if v is not None}, "name": name}
    try:
        return pb.FineTuneConfig(**values)
    except (TypeError, ValueError) as err:  # a value of the wrong type or out of the field's range
        raise type(err)(f"invalid fine-tune option value: {err}") from None


class _Upload:
    """The FineTune request stream. grpc reads it on its own thread and turns a local error (an
    unreadable file, a bad image type) into a bare CANCELLED; this keeps the error to re-raise."""

    def __init__(self, config: pb.FineTuneConfig, examples: Iterable[Example],
                 on_upload: Callable[[int], None] | None) -> None:
        self.config, self.examples, self.on_upload = config, examples, on_upload
        self.error: BaseException | None = None
        self.sent = 0

    def __iter__(self) -> Iterator[pb.FineTuneRequest]:
        try:
            yield pb.FineTuneRequest(config=self.config)
            batch: list[pb.Example] = []
            size = 0
            for example in self.examples:
                data = encode(example.image)
                if batch and (len(batch) >= BATCH_IMAGES or size + len(data) > BATCH_BYTES):
                    yield self._send(batch)
                    batch, size = [], 0
                batch.append(pb.Example(image=data, label=example.label, validation=example.validation))
                size += len(data)
            if batch:
                yield self._send(batch)
        except Exception as err:
            self.error = err
            raise

    def _send(self, batch: list[pb.Example]) -> pb.FineTuneRequest:
        self.sent += len(batch)
        if self.on_upload is not None:
            self.on_upload(self.sent)
        return pb.FineTuneRequest(batch=pb.ExampleBatch(examples=batch))


class Client:
    """A connection to one headswap server.

    `target` is HOST:PORT (or a `Connection`). TLS is on when `tls_ca_file` (the CA that signed the
    server's certificate) or a client certificate is given; `token` is sent as a bearer token on every
    call. `timeout` is the default deadline in seconds of each unary call (None: no deadline); the
    streaming ones (`submit`'s upload, `watch`) take only the `timeout` given to them.

        with Client("localhost:50051") as client:
            [top] = client.classify("cat.jpg", top_k=1)
    """

    def __init__(self, target: str | Connection, *, token: str | None = None, tls_ca_file: str | None = None,
                 tls_cert_file: str | None = None, tls_key_file: str | None = None,
                 tls_server_name: str | None = None, timeout: float | None = None) -> None:
        if isinstance(target, Connection):
            self.connection = target
        else:
            self.connection = Connection(str(target), _path(tls_ca_file), _path(tls_cert_file),
                                         _path(tls_key_file), tls_server_name or "", token or "")
        self.timeout = timeout
        self._channel = channel(self.connection)
        self._inference = pb_grpc.InferenceStub(self._channel)
        self._models = pb_grpc.ModelsStub(self._channel)
        self._training = pb_grpc.TrainingStub(self._channel)

    # --- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.connection.target!r}{', tls' if self.connection.tls else ''})"

    # --- inference --------------------------------------------------------------------------

    def classify(self, images: ImageLike | Iterable[ImageLike], model: str | None = None, version: int = 0,
                 top_k: int = 5, *, timeout: float | None = None, routing_key: str | None = None) -> Classifications:
        """Classify images (encoded bytes, file paths, PIL images or uint8 arrays; one or a list).

        Returns one list of `Prediction` per image, best first, with the image's `ood_score` and
        `in_distribution` (`ImagePredictions`); `.model` and `.version` on the result say which model
        answered (`model=None`: the server's default; `version=0`: the active one).
        `routing_key` (an end user's id): during a rollout, one key always gets the same version.
        """
        batch = [images] if is_single_image(images) else list(images)  # type: ignore[arg-type]
        if not batch:
            raise ValueError("no images to classify")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"version must be 0 (the active one) or a version number, got {version!r}")
        request = pb.ClassifyRequest(images=[encode(image) for image in batch], top_k=top_k, model=model or "",
                                     version=version)
        metadata = (("routing-key", routing_key),) if routing_key else None
        response = self._call(self._inference.Classify, request, timeout, metadata)
        return Classifications([ImagePredictions.from_message(result) for result in response.results],
                               response.model, response.version)

    def rank_for_labelling(self, images: ImageLike | Iterable[ImageLike], model: str | None = None, top: int = 10,
                           version: int = 0, *, uncertainty: str = "margin", batch_size: int = RANK_BATCH_IMAGES,
                           timeout: float | None = None) -> Ranking:
        """Which of these unlabelled images to label next, best first (RankForLabelling).

        Up to `batch_size` images go in one call. More are ranked as a tournament: each batch's
        best `top` go on to a next round, until the finalists fit in one call, whose answer is
        the ranking (so it never holds near-duplicates). When `top` >= `batch_size` no round can
        narrow the field: the batches' picks are merged by uncertainty, and near-duplicates are
        only kept apart within a batch. Files are read when their batch is sent.
        """
        given = [images] if is_single_image(images) else list(images)
        if not given:
            raise ValueError("no images to rank")
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise ValueError(f"top must be a positive integer, got {top!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        already: dict[int, RankedImage] = {}
        duplicates = 0
        field = list(range(len(given)))  # indices (into `given`) still in the running
        while True:
            picks: list[RankedImage] = []
            for start in range(0, len(field), batch_size):
                part = field[start:start + batch_size]
                response = self._call(self._inference.RankForLabelling, pb.RankForLabellingRequest(
                    images=[encode(given[i]) for i in part], model=model or "", version=version,
                    top=min(top, len(part)), uncertainty=uncertainty), timeout)
                for item in response.images:
                    ranked = RankedImage(part[item.index], item.rank, item.uncertainty, item.predicted_label,
                                         item.predicted_score, item.already_labelled)
                    if item.already_labelled:
                        already[ranked.index] = ranked
                    else:
                        picks.append(ranked)
                duplicates += response.near_duplicates
                model, version = response.model, response.version  # every round on the same version
            single = len(field) <= batch_size
            if single or len(picks) >= len(field):  # one call ranked them all, or no round can narrow them
                if not single:
                    picks.sort(key=lambda image: (-image.uncertainty, image.index))
                picks = [RankedImage(p.index, rank, p.uncertainty, p.label, p.score)
                         for rank, p in enumerate(picks[:top], start=1)]
                return Ranking(picks, sorted(already.values(), key=lambda image: image.index), response.model,
                               response.version, response.uncertainty, response.training_set_known,
                               response.training_set_size, duplicates)
            field = sorted(p.index for p in picks)

    # --- models -----------------------------------------------------------------------------

    def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model in the server's registry, with its versions and the active one."""
        response = self._call(self._models.ListModels, pb.ListModelsRequest(), timeout)
        return [ModelInfo.from_message(m) for m in response.models]

    def model(self, name: str, version: int = 0, *, timeout: float | None = None) -> ModelInfo:
        """One model version (0: the active one), with its manifest."""
        return ModelInfo.from_message(
            self._call(self._models.GetModel, pb.GetModelRequest(name=name, version=version), timeout))

    def activate(self, name: str, version: int, *, timeout: float | None = None) -> ModelInfo:
        """Make a stored version the one that answers; takes effect without a restart."""
        return ModelInfo.from_message(
            self._call(self._models.ActivateModel, pb.ActivateModelRequest(name=name, version=version), timeout))

    def rollback(self, name: str, *, timeout: float | None = None) -> ModelInfo:
        """Re-activate the version that was active before the current one."""
        return ModelInfo.from_message(
            self._call(self._models.RollbackModel, pb.RollbackModelRequest(name=name), timeout))

    # --- rollouts (docs/rollouts.md) --------------------------------------------------------

    def start_rollout(self, name: str, version: int, *, canary: int = 0, shadow: int = 0, manual: bool = False,
                      timeout: float | None = None) -> RolloutStatus:
        """Roll `version` out beside the active one: `canary=P` (it answers P% of requests) or
        `shadow=P` (it runs on a copy of P%, answers discarded); promoted or rolled back on its
        figures unless `manual`."""
        if bool(canary) == bool(shadow):
            raise ValueError("give exactly one of canary=PERCENT or shadow=PERCENT")
        request = pb.StartRolloutRequest(name=name, version=version, mode="canary" if canary else "shadow",
                                         percent=canary or shadow, manual=manual)
        return RolloutStatus.from_message(self._call(self._models.StartRollout, request, timeout))

    def rollout(self, name: str, *, timeout: float | None = None) -> RolloutStatus:
        """The running rollout with live figures, else the last that ended."""
        return RolloutStatus.from_message(self._call(self._models.GetRollout, pb.RolloutRequest(name=name), timeout))

    def promote_rollout(self, name: str, *, timeout: float | None = None) -> RolloutStatus:
        return RolloutStatus.from_message(
            self._call(self._models.PromoteRollout, pb.RolloutRequest(name=name), timeout))

    def abort_rollout(self, name: str, *, timeout: float | None = None) -> RolloutStatus:
        return RolloutStatus.from_message(
            self._call(self._models.AbortRollout, pb.RolloutRequest(name=name), timeout))

    # --- training ---------------------------------------------------------------------------

    def finetune(self, data: FineTuneData, *, name: str, validation_data: FineTuneData | None = None,
                 on_progress: Callable[[JobEvent], None] | None = None,
                 on_upload: Callable[[int], None] | None = None, timeout: float | None = None,
                 **config: Unpack[FineTuneOptions]) -> Job:
        """Fine-tune a new model NAME on `data` and wait for the job to end; returns the finished `Job`.

        `data` is a folder (DATA/<class>/<image files>) or (image, label) pairs; `validation_data`
        (same forms) replaces the random validation split. `config` takes the FineTuneConfig fields
        (epochs=, learning_rate=, base_model=, ...). `on_upload(sent)` is called after each batch is
        sent, `on_progress(event)` with every job event. A job that fails or is cancelled is returned
        too: check `job.succeeded` (or `job.state`, `job.error`).
        """
        submission = self.submit(data, name=name, validation_data=validation_data, on_upload=on_upload,
                                 timeout=timeout, **config)
        return self.watch(submission.job_id, on_progress=on_progress)

    def submit(self, data: FineTuneData, *, name: str, validation_data: FineTuneData | None = None,
               on_upload: Callable[[int], None] | None = None, timeout: float | None = None,
               **config: Unpack[FineTuneOptions]) -> Submission:
        """Upload a fine-tune job and return once the server accepted it (it trains in the background)."""
        message = finetune_config(name, config)
        examples: Iterable[Example] = examples_of(data)
        if validation_data is not None:
            examples = itertools.chain(examples, examples_of(validation_data, validation=True))
        upload = _Upload(message, examples, on_upload)
        try:
            response = self._training.FineTune(iter(upload), timeout=timeout)
        except grpc.RpcError as err:
            if upload.error is not None:
                raise upload.error from None
            raise from_rpc_error(err) from None
        return Submission(response.job_id, response.num_images, response.num_classes,
                          tuple(response.skipped_indices))

    def watch(self, job_id: str, on_progress: Callable[[JobEvent], None] | None = None, *,
              timeout: float | None = None) -> Job:
        """Follow a job until it ends, calling `on_progress` with each event (from its first);
        returns the finished `Job`."""
        stream = self._training.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=timeout)
        last: JobEvent | None = None
        try:
            for message in stream:
                last = JobEvent.from_message(message)
                if on_progress is not None:
                    on_progress(last)
                if last.state.terminal:
                    break
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            stream.cancel()  # no-op once the stream ended; stops it when a callback raised
        job = self.job(job_id)
        if not job.state.terminal:
            raise UnavailableError(f"the server stopped sending progress of job {job_id} before it ended "
                                   f"({job.state.name.lower()}, {job.phase}); it goes on on the server")
        return job

    def job(self, job_id: str, *, timeout: float | None = None) -> Job:
        """One job: state, phase, result, metrics, configuration."""
        return Job.from_message(self._call(self._training.GetJob, pb.GetJobRequest(job_id=job_id), timeout))

    def jobs(self, *, timeout: float | None = None) -> list[Job]:
        """The jobs the caller may see (all of them for an admin or without authentication)."""
        response = self._call(self._training.ListJobs, pb.ListJobsRequest(), timeout)
        return [Job.from_message(job) for job in response.jobs]

    def cancel(self, job_id: str, *, timeout: float | None = None) -> Job:
        """Cancel a queued or running job."""
        return Job.from_message(self._call(self._training.CancelJob, pb.CancelJobRequest(job_id=job_id), timeout))

    # --- health -----------------------------------------------------------------------------

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status name of the server ('') or of one service or model: SERVING, ..."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        response = self._call(health_pb2_grpc.HealthStub(self._channel).Check,
                              health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    # --- helpers ----------------------------------------------------------------------------

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _call(self, method: Callable[..., Any], request: Any, timeout: float | None,
              metadata: tuple[tuple[str, str], ...] | None = None) -> Any:
        try:
            return method(request, timeout=self._timeout(timeout), metadata=metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None


def _path(value: str | os.PathLike[str] | None) -> str:
    return os.fspath(value) if value else ""

