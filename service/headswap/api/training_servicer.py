"""headswap.v1 Training service: protobuf <-> domain (JobManager), and errors -> status codes.

FineTune (client streaming) and WatchJob (server streaming) use `CallScope` directly, the same
error mapping the unary `@rpc` wrapper applies. Both may wait on their caller for long, so each
takes one of a fixed number of slots before anything else (RESOURCE_EXHAUSTED when none is
free: `admission.py`), and an upload is ended when its caller goes idle (`streams.paced`).

Jobs carry their submitter: `submitter(context)` names the caller and `owner(context)` limits
what a caller sees (None = every job). Without authentication both are "" / None.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator


from headswap import errors
from headswap.api import auth
from headswap.api.status import CallScope, rpc
from headswap.api.streams import paced
from headswap.protocol import headswap_v1_pb2 as pb
from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc
from headswap.training.dataset import Example
from headswap.training.jobs import JobManager
from headswap.training.store import JobEvent, JobRecord

def config_values(config: pb.FineTuneConfig) -> dict[str, Any]:
    """The config message as a plain dict (unset fields as 0 / empty: FineTuneSpec fills defaults)."""
    values: dict[str, Any] = {}
    for field in config.DESCRIPTOR.fields:
        value = getattr(config, field.name)
        if field.name == "class_weights":
            value = {k: _float32(w) for k, w in value.items()}
        elif isinstance(value, float):
            value = _float32(value)  # 0.1 arrives as 0.10000000149011612
        values[field.name] = value
    return values


def _float32(value: float) -> float:
    return float(f"{value:.7g}")


def _examples(requests: Iterator[pb.FineTuneRequest]) -> Iterable[list[Example]]:
    for request in requests:
        if request.WhichOneof("item") != "batch":
            raise errors.InvalidInput("only the first FineTune message may carry the config; the following "
                                      "ones carry batches of labelled images")
        yield [Example(e.image, e.label, e.validation) for e in request.batch.examples]


def event_message(event: JobEvent) -> pb.JobEvent:
    return pb.JobEvent(job_id=event.job_id, state=int(event.state), phase=event.phase, epoch=event.epoch,
                       total_epochs=event.total_epochs, loss=event.loss, accuracy=event.accuracy,
                       val_accuracy=event.val_accuracy, images_per_second=event.images_per_second,
                       eta_seconds=event.eta_seconds, message=event.message, model=event.model,
                       version=event.version, metrics_json=event.metrics_json, time=event.time,
                       sequence=event.sequence)


def job_message(job: JobRecord) -> pb.Job:
    message = pb.Job(job_id=job.job_id, state=int(job.state), name=job.name, base_model=job.base_model,
                     phase=job.phase, error=job.error, model=job.model, version=job.version, created=job.created,
                     finished=job.finished, metrics_json=job.metrics_json, config_json=job.config_json,
                     activated=job.activated, submitter=job.submitter)
    if job.last_event is not None:
        message.last_event.CopyFrom(event_message(job.last_event))
    return message


class TrainingServicer(pb_grpc.TrainingServicer):
    def __init__(self, jobs: JobManager) -> None:
        self.jobs = jobs

    def submitter(self, context) -> str:
        """Who is calling, recorded on the jobs they submit ("" without authentication)."""
        principal = auth.caller()  # set by the AuthInterceptor: a credential's name, never a token
        return principal.name if principal.via != "none" else ""

    def owner(self, context) -> str | None:
        """Whose jobs this caller may see and cancel (None = everyone's: admin, or no authentication)."""
        return auth.job_owner()

    def FineTune(self, request_iterator: Iterator[pb.FineTuneRequest], context) -> pb.FineTuneResponse:
        with CallScope("FineTune", context):
            settings = self.jobs.settings
            with self.jobs.upload_slots.take():  # before the first message is read
                requests = paced(request_iterator, settings.upload_idle_timeout_s, settings.max_upload_seconds,
                                 "the FineTune upload")
                first = next(requests, None)
                if first is None or first.WhichOneof("item") != "config":
                    raise errors.InvalidInput("the first FineTune message must carry the config (base model, "
                                              "name, epochs, ...); the labelled images follow in later messages")
                submission = self.jobs.submit(config_values(first.config), _examples(requests),
                                              submitter=self.submitter(context))
            return pb.FineTuneResponse(job_id=submission.job_id, num_images=submission.num_images,
                                       num_classes=submission.num_classes, skipped_indices=submission.skipped)

    def WatchJob(self, request: pb.WatchJobRequest, context) -> Iterator[pb.JobEvent]:
        with CallScope("WatchJob", context):
            with self.jobs.watch_slots.take():
                for event in self.jobs.watch(request.job_id, context.is_active, owner=self.owner(context)):
                    yield event_message(event)

    @rpc("GetJob")
    def GetJob(self, request: pb.GetJobRequest, context) -> pb.Job:
        return job_message(self.jobs.get(request.job_id, owner=self.owner(context)))

    @rpc("ListJobs")
    def ListJobs(self, request: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        return pb.ListJobsResponse(jobs=[job_message(job) for job in self.jobs.list(owner=self.owner(context))])

    @rpc("CancelJob")
    def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.Job:
        return job_message(self.jobs.cancel(request.job_id, owner=self.owner(context)))
