"""headswap.v1 Inference and Models services: protobuf <-> domain, nothing more."""

from __future__ import annotations

import json
import time

import grpc

from headswap.admission import SlotsPerKey
from headswap.api.auth import caller, caller_key, routing_key
from headswap.api.names import requested_model
from headswap.api.status import rpc
from headswap.errors import InvalidInput, NotFound
from headswap.inference.classifier import Classifier, check_version
from headswap.inference.labelling import LabellingRanker
from headswap.inference.manager import ModelManager
from headswap.inference.ood import OodSpec
from headswap.protocol import headswap_v1_pb2 as pb
from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc
from headswap.registry.registry import Registry


def deadline_of(context: grpc.ServicerContext) -> float | None:
    """The call's deadline on the monotonic clock, or None when the caller set none."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e8 else time.monotonic() + remaining


def stopped(context: grpc.ServicerContext):
    """A `should_stop` for the domain: true once the caller cancelled or went away (or the server
    is shutting down), so work on its request stops without the domain seeing grpc."""
    return lambda: not context.is_active()


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, classifier: Classifier, callers: SlotsPerKey) -> None:
        self.classifier = classifier
        self.callers = callers  # --max-inference-calls-per-caller, shared with KServe's ModelInfer
        self.ranker = LabellingRanker(classifier)

    @rpc("Classify", lambda r: r.model)
    def Classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> pb.ClassifyResponse:
        model = requested_model(request.model, self.classifier.default_model)
        with self.callers.take(caller_key(context)):
            answer, results = self.classifier.classify(list(request.images), request.top_k, model,
                                                       request.version, deadline_of(context), stopped(context),
                                                       routing_key(context))
        scores = answer.ood_scores
        accepted = answer.in_distribution
        return pb.ClassifyResponse(
            model=answer.model, version=answer.version,
            results=[pb.Classification(predictions=[pb.Prediction(label=p.label, index=p.index, score=p.score)
                                                    for p in predictions],
                                       ood_score=float(scores[i]) if scores is not None else 0.0,
                                       in_distribution=bool(accepted[i]) if accepted is not None else None)
                     for i, predictions in enumerate(results)])

    @rpc("RankForLabelling", lambda r: r.model)
    def RankForLabelling(self, request: pb.RankForLabellingRequest,
                         context: grpc.ServicerContext) -> pb.RankForLabellingResponse:
        model = requested_model(request.model, self.classifier.default_model)
        with self.callers.take(caller_key(context)):
            advice = self.ranker.rank(list(request.images), request.top, model, request.version,
                                      request.uncertainty, deadline_of(context), stopped(context))
        return pb.RankForLabellingResponse(
            model=advice.model, version=advice.version, uncertainty=advice.uncertainty,
            training_set_known=advice.training_set_known, training_set_size=advice.training_set_size,
            near_duplicates=advice.near_duplicates,
            images=[pb.RankedImage(index=i.index, rank=i.rank, uncertainty=i.uncertainty, predicted_label=i.label,
                                   predicted_score=i.score, already_labelled=i.already_labelled)
                    for i in advice.images])


class ModelsServicer(pb_grpc.ModelsServicer):
    def __init__(self, registry: Registry, manager: ModelManager) -> None:
        self.registry = registry
        self.manager = manager

    def describe(self, name: str, version: int = 0) -> pb.ModelInfo:
        requested_model(name)
        check_version(version)
        versions = self.registry.versions(name)
        if not versions:
            raise NotFound(f"unknown model {name!r}; models in the registry: "
                           f"{', '.join(self.registry.models()) or 'none'}")
        active = self.registry.active_version(name) or 0
        version = self.registry.resolve(name, version)
        manifest = self.registry.manifest(name, version)
        size = manifest.get("input", {})
        ood = OodSpec.for_manifest(manifest)
        return pb.ModelInfo(
            name=name, version=version, active_version=active, versions=versions,
            source=str(manifest.get("source", "")), num_labels=len(manifest.get("labels") or []),
            input_height=int(size.get("height", 0)), input_width=int(size.get("width", 0)),
            ready=self.manager.is_ready(name, version), created=str(manifest.get("created", "")),
            manifest_json=json.dumps(manifest), ood_method=ood.method, ood_threshold=ood.threshold)

    @rpc("ListModels")
    def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        infos = []
        for name in self.registry.models():
            if self.registry.versions(name):
                infos.append(self.describe(name))
        return pb.ListModelsResponse(models=infos)

    @rpc("GetModel", lambda r: r.name)
    def GetModel(self, request: pb.GetModelRequest, context) -> pb.ModelInfo:
        return self.describe(request.name, request.version)

    @rpc("ActivateModel", lambda r: r.name)
    def ActivateModel(self, request: pb.ActivateModelRequest, context) -> pb.ModelInfo:
        if request.version < 1:
            raise InvalidInput(f"version must be a positive version number, got {request.version}")
        self.manager.activate(requested_model(request.name), request.version)
        return self.describe(request.name)

    @rpc("RollbackModel", lambda r: r.name)
    def RollbackModel(self, request: pb.RollbackModelRequest, context) -> pb.ModelInfo:
        self.manager.rollback(requested_model(request.name))
        return self.describe(request.name)

    @rpc("StartRollout", lambda r: r.name)
    def StartRollout(self, request: pb.StartRolloutRequest, context) -> pb.RolloutStatus:
        name = requested_model(request.name)
        if request.version < 1:
            raise InvalidInput(f"version must be a positive version number, got {request.version}")
        self.manager.start_rollout(name, request.version, request.mode, request.percent, request.manual,
                                   caller().name)
        return rollout_status(name, self.manager.rollout_status(name))

    @rpc("GetRollout", lambda r: r.name)
    def GetRollout(self, request: pb.RolloutRequest, context) -> pb.RolloutStatus:
        name = requested_model(request.name)
        return rollout_status(name, self.manager.rollout_status(name))

    @rpc("PromoteRollout", lambda r: r.name)
    def PromoteRollout(self, request: pb.RolloutRequest, context) -> pb.RolloutStatus:
        name = requested_model(request.name)
        return rollout_status(name, self.manager.end_rollout(name, True, caller().name))

    @rpc("AbortRollout", lambda r: r.name)
    def AbortRollout(self, request: pb.RolloutRequest, context) -> pb.RolloutStatus:
        name = requested_model(request.name)
        return rollout_status(name, self.manager.end_rollout(name, False, caller().name))


def rollout_status(name: str, record: dict) -> pb.RolloutStatus:
    """A rollout's record (the pointer's, plus live figures) -> RolloutStatus."""
    return pb.RolloutStatus(
        name=name, running=bool(record.get("running")), id=str(record.get("id", "")),
        stable_version=int(record.get("stable", 0)), candidate_version=int(record.get("candidate", 0)),
        mode=str(record.get("mode", "")), percent=int(record.get("percent", 0)), manual=bool(record.get("manual")),
        rules_json=json.dumps(record.get("rules", {})), outcome=str(record.get("outcome", "")),
        started=str(record.get("started", "")), ended=str(record.get("ended", "")),
        figures=[pb.VersionFigures(**figures) for figures in record.get("live", [])],
        events=[pb.RolloutEvent(time=float(e.get("time", 0)), what=str(e.get("what", "")),
                                figures_json=json.dumps(e.get("figures", {})))
                for e in record.get("events", [])])
