"""What the client returns: plain, immutable Python objects instead of protobuf messages, so that
callers never import generated code and type checkers see every field.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

from headswap.protocol import headswap_v1_pb2 as pb


@dataclass(frozen=True)
class Prediction:
    """One class of a classification: its label, its index in the model's outputs, its probability."""

    label: str
    index: int
    score: float


class ImagePredictions(list[Prediction]):
    """One image's predictions, best first, and how unlike the model's training images it is:
    `ood_score` (higher = less like them; the model's `ood_method` says which score) and
    `in_distribution` (under the model's threshold; None when the model has no threshold)."""

    def __init__(self, predictions: list[Prediction], ood_score: float = 0.0,
                 in_distribution: bool | None = None) -> None:
        super().__init__(predictions)
        self.ood_score = ood_score
        self.in_distribution = in_distribution

    @classmethod
    def from_message(cls, result: pb.Classification) -> "ImagePredictions":
        return cls([Prediction(p.label, p.index, p.score) for p in result.predictions], result.ood_score,
                   result.in_distribution if result.HasField("in_distribution") else None)


class Classifications(list[list[Prediction]]):
    """One list of predictions per image, in the order the images were given, plus which model
    and version answered (the active version when none was asked for)."""

    def __init__(self, results: list[list[Prediction]], model: str, version: int) -> None:
        super().__init__(results)
        self.model = model
        self.version = version


@dataclass(frozen=True)
class RankedImage:
    """One image of a `rank_for_labelling` call: its index among the images given, its rank (1 = label
    it first; 0 = not recommended: already labelled), how undecided the model is (0..1) and its answer."""

    index: int
    rank: int
    uncertainty: float
    label: str
    score: float
    already_labelled: bool = False


class Ranking(list[RankedImage]):
    """The images to label next, best first; `already_labelled`: the given images the model was
    trained on (same sha256), never recommended. `training_set_known` is False when the model records
    no training set (zero-shot, or a version published before training sets were recorded)."""

    def __init__(self, ranked: list[RankedImage], already_labelled: list[RankedImage], model: str, version: int,
                 uncertainty: str, training_set_known: bool, training_set_size: int, near_duplicates: int) -> None:
        super().__init__(ranked)
        self.already_labelled = already_labelled
        self.model, self.version, self.uncertainty = model, version, uncertainty
        self.training_set_known, self.training_set_size = training_set_known, training_set_size
        self.near_duplicates = near_duplicates


class JobState(enum.IntEnum):
    """A fine-tune job's state (the values of headswap.v1.JobState)."""

    UNSPECIFIED = pb.JOB_STATE_UNSPECIFIED
    QUEUED = pb.JOB_STATE_QUEUED
    RUNNING = pb.JOB_STATE_RUNNING
    SUCCEEDED = pb.JOB_STATE_SUCCEEDED
    FAILED = pb.JOB_STATE_FAILED
    CANCELLED = pb.JOB_STATE_CANCELLED

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    @classmethod
    def of(cls, value: int) -> "JobState":
        try:
            return cls(value)
        except ValueError:  # a newer server's state
            return cls.UNSPECIFIED


@dataclass(frozen=True)
class JobEvent:
    """One progress event of a job (what WatchJob streams): phase, epoch figures, images/s, ETA."""

    job_id: str
    state: JobState
    phase: str
    sequence: int
    time: float
    message: str = ""
    epoch: int = 0
    total_epochs: int = 0
    loss: float = 0.0
    accuracy: float = 0.0
    val_accuracy: float = 0.0
    images_per_second: float = 0.0
    eta_seconds: float = 0.0
    model: str = ""
    version: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_message(cls, event: pb.JobEvent) -> "JobEvent":
        return cls(job_id=event.job_id, state=JobState.of(event.state), phase=event.phase, sequence=event.sequence,
                   time=event.time, message=event.message, epoch=event.epoch, total_epochs=event.total_epochs,
                   loss=event.loss, accuracy=event.accuracy, val_accuracy=event.val_accuracy,
                   images_per_second=event.images_per_second, eta_seconds=event.eta_seconds, model=event.model,
                   version=event.version, metrics=_json(event.metrics_json))


@dataclass(frozen=True)
class Job:
    """A fine-tune job as the server records it; `model`/`version` name the stored result once it succeeded."""

    job_id: str
    state: JobState
    name: str
    base_model: str
    phase: str
    error: str = ""
    model: str = ""
    version: int = 0
    activated: bool = False
    created: float = 0.0
    finished: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    submitter: str = ""
    last_event: JobEvent | None = None

    @property
    def succeeded(self) -> bool:
        return self.state == JobState.SUCCEEDED

    @classmethod
    def from_message(cls, job: pb.Job) -> "Job":
        return cls(job_id=job.job_id, state=JobState.of(job.state), name=job.name, base_model=job.base_model,
                   phase=job.phase, error=job.error, model=job.model, version=job.version, activated=job.activated,
                   created=job.created, finished=job.finished, metrics=_json(job.metrics_json),
                   config=_json(job.config_json), submitter=job.submitter,
                   last_event=JobEvent.from_message(job.last_event) if job.HasField("last_event") else None)


@dataclass(frozen=True)
class Submission:
    """The server accepted a FineTune upload: the job's id, what it counted, and the images it skipped
    as undecodable (indices in upload order; only with skip_invalid_images)."""

    job_id: str
    num_images: int
    num_classes: int
    skipped: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    """A registry model as the server describes it."""

    name: str
    version: int
    active_version: int
    versions: tuple[int, ...]
    source: str
    num_labels: int
    input_height: int
    input_width: int
    ready: bool
    created: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)
    ood_method: str = ""  # the out-of-distribution score its predictions carry (e.g. "max_softmax")
    ood_threshold: float | None = None  # None: in_distribution is not decided for this model

    @classmethod
    def from_message(cls, info: pb.ModelInfo) -> "ModelInfo":
        return cls(name=info.name, version=info.version, active_version=info.active_version,
                   versions=tuple(info.versions), source=info.source, num_labels=info.num_labels,
                   input_height=info.input_height, input_width=info.input_width, ready=info.ready,
                   created=info.created, manifest=_json(info.manifest_json), ood_method=info.ood_method,
                   ood_threshold=info.ood_threshold if info.HasField("ood_threshold") else None)


@dataclass(frozen=True)
class RolloutStatus:
    """A model's rollout: the running one with the answering replica's live figures per version
    (`figures`: dicts of requests, errors, error_rate, p50_ms, p99_ms, agreement...), or the last
    that ended (`running` False, `outcome` promoted / rolled_back / aborted)."""

    name: str
    running: bool
    stable_version: int
    candidate_version: int
    mode: str
    percent: int
    manual: bool
    outcome: str
    rules: dict[str, Any]
    figures: tuple[dict[str, Any], ...]
    events: tuple[dict[str, Any], ...]

    @classmethod
    def from_message(cls, status: pb.RolloutStatus) -> "RolloutStatus":
        figure_fields = [f.name for f in pb.VersionFigures.DESCRIPTOR.fields]
        return cls(name=status.name, running=status.running, stable_version=status.stable_version,
                   candidate_version=status.candidate_version, mode=status.mode, percent=status.percent,
                   manual=status.manual, outcome=status.outcome, rules=_json(status.rules_json),
                   figures=tuple({f: getattr(v, f) for f in figure_fields} for v in status.figures),
                   events=tuple({"time": e.time, "what": e.what, "figures": _json(e.figures_json)}
                                for e in status.events))


def _json(text: str) -> dict[str, Any]:
    return json.loads(text) if text else {}
