"""Safe rollouts (issue 21): canary split, shadow comparison, automatic promote/rollback, replicas
following one rollout in active.json, crash safety, and bad input.

Candidates are real ONNX files built here: a tiny classifier (8x8 pixels -> 4 classes, so that
thousands of requests take seconds), the same with an op that fails on real images (warm-up's
all-zero input passes, so it loads), the same with a deliberately slow branch, and the built-in
EfficientNet-Lite0 with two classes swapped (for shadow agreement on real photos).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import BUILTIN_NAME, encode, run_cli
from headswap.protocol import headswap_v1_pb2 as pb
from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc
from headswap.inference.rollout import Rollout
from headswap.registry.registry import Registry

TINY = "tiny"
SIZE = 8
CLASSES = 4


# --- models built for the tests ---------------------------------------------------------------

def tiny_graph(seed: int, kind: str = "good") -> onnx.ModelProto:
    """image [N, 8, 8, 3] -> Flatten -> MatMul -> Softmax -> probabilities [N, 4].

    kind "error": a Reshape whose target depends on the input: all zeros (the warm-up) pass, any real
    image fails at run time. kind "slow": a chain of 256x256 MatMuls on an input-dependent matrix,
    multiplied by zero and added (same answers, many times the work)."""
    rng = np.random.default_rng(seed)
    weights = numpy_helper.from_array(rng.normal(size=(SIZE * SIZE * 3, CLASSES)).astype(np.float32), "w")
    nodes = [helper.make_node("Flatten", ["image"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "w"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["soft"], axis=1)]
    inits = [weights]
    out = "soft"
    if kind == "error":
        inits += [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                  numpy_helper.from_array(np.array(CLASSES, np.int64), "ok_width"),
                  numpy_helper.from_array(np.array(3, np.int64), "bad_width"),
                  numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
        nodes += [helper.make_node("Abs", ["image"], ["abs"]),
                  helper.make_node("ReduceMax", ["abs"], ["peak"], keepdims=0),
                  helper.make_node("Equal", ["peak", "zero"], ["is_zero"]),
                  helper.make_node("Where", ["is_zero", "ok_width", "bad_width"], ["width"]),
                  helper.make_node("Unsqueeze", ["width", "axes0"], ["width1"]),
                  helper.make_node("Concat", ["minus_one", "width1"], ["shape"], axis=0),
                  helper.make_node("Reshape", ["soft", "shape"], ["reshaped"])]
        inits.append(numpy_helper.from_array(np.array([0], np.int64), "axes0"))
        out = "reshaped"
    elif kind == "slow":
        inits += [numpy_helper.from_array(rng.uniform(-1, 1, (256, 256)).astype(np.float32), "c"),
                  numpy_helper.from_array((rng.uniform(-1, 1, (256, 256)) / 16).astype(np.float32), "c2"),
                  numpy_helper.from_array(np.array(0.0, np.float32), "nothing")]
        nodes += [helper.make_node("ReduceMean", ["image"], ["mean"], keepdims=0),
                  helper.make_node("Mul", ["c", "mean"], ["m0"])]
        for i in range(60):
            nodes.append(helper.make_node("MatMul", [f"m{i}", "c2"], [f"m{i + 1}"]))
        nodes += [helper.make_node("ReduceSum", ["m60"], ["total"], keepdims=0),
                  helper.make_node("Mul", ["total", "nothing"], ["naught"]),
                  helper.make_node("Add", ["soft", "naught"], ["slowed"])]
        out = "slowed"
    nodes.append(helper.make_node("Identity", [out], ["probabilities"]))
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


TINY_MANIFEST = {"kind": "test", "source": "test:tiny", "labels": ["a", "b", "c", "d"],
                 "preprocessing": {"resize": "center_crop", "mode": "test", "channel_order": "RGB",
                                   "mean": [127.0] * 3, "std": [128.0] * 3},
                 "input": {"name": "image", "height": SIZE, "width": SIZE, "layout": "NHWC", "dtype": "float32"},
                 "outputs": {"probabilities": "probabilities"}}


def publish_tiny(registry_dir: Path, tmp_path: Path, seed: int, kind: str = "good", activate: bool = False,
                 name: str = TINY) -> int:
    path = tmp_path / f"tiny-{kind}-{seed}-{time.monotonic_ns()}.onnx"
    onnx.save(tiny_graph(seed, kind), str(path))
    return Registry(registry_dir).publish(name, path, dict(TINY_MANIFEST), activate=activate)


def publish_swapped_builtin(registry_dir: Path, tmp_path: Path, swap: tuple[int, int]) -> int:
    """The built-in model with two output classes swapped: it disagrees with v1 exactly on the images
    whose top-1 is one of them."""
    registry = Registry(registry_dir)
    path, manifest = registry.verified_model_path(BUILTIN_NAME, 1)
    model = onnx.load(str(path))
    graph = model.graph
    output = next(o for o in graph.output if o.name == "probabilities")
    order = np.arange(len(manifest["labels"]), dtype=np.int64)
    order[[swap[0], swap[1]]] = order[[swap[1], swap[0]]]
    for node in graph.node:
        node.output[:] = ["probabilities_unswapped" if o == "probabilities" else o for o in node.output]
    graph.initializer.append(numpy_helper.from_array(order, "swap_order"))
    graph.node.append(helper.make_node("Gather", ["probabilities_unswapped", "swap_order"], ["probabilities"],
                                       axis=1))
    del output  # the graph output keeps its name, now produced by the Gather
    copy = tmp_path / "swapped.onnx"
    onnx.save(model, str(copy))
    base = {k: v for k, v in manifest.items() if k not in ("name", "version", "sha256", "created")}
    return registry.publish(BUILTIN_NAME, copy, base)


# --- calling the server -----------------------------------------------------------------------

def tiny_images(count: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [encode(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), "PNG") for _ in range(count)]


def classify(server, images: list[bytes], model: str = TINY, version: int = 0, key: str | None = None,
             stub=None) -> pb.ClassifyResponse:
    stub = stub or pb_grpc.InferenceStub(server.channel())
    return stub.Classify(pb.ClassifyRequest(images=images, model=model, version=version, top_k=1), timeout=60,
                         metadata=(("routing-key", key),) if key else None)


def models(server):
    return pb_grpc.ModelsStub(server.channel())


def start(server, version: int, mode: str = "canary", percent: int = 10, manual: bool = False,
          name: str = TINY) -> pb.RolloutStatus:
    return models(server).StartRollout(pb.StartRolloutRequest(name=name, version=version, mode=mode,
                                                              percent=percent, manual=manual), timeout=60)


def status(server, name: str = TINY) -> pb.RolloutStatus:
    return models(server).GetRollout(pb.RolloutRequest(name=name), timeout=30)


def pointer(registry_dir: Path, name: str = TINY) -> dict:
    return json.loads((registry_dir / name / "active.json").read_text())


def figures(rollout: pb.RolloutStatus) -> dict[str, pb.VersionFigures]:
    return {f.role: f for f in rollout.figures}


def wait_for(predicate, timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# --- canary -----------------------------------------------------------------------------------

def test_canary_split_sticky_keys_and_pinned_versions(server_factory, registry_copy, tmp_path):
    import tritonclient.grpc as tc

    publish_tiny(registry_copy, tmp_path, 1, activate=True)
    candidate = publish_tiny(registry_copy, tmp_path, 2)
    server = server_factory(registry_copy)
    started = start(server, candidate, "canary", 10, manual=True)
    assert started.running and started.candidate_version == candidate and started.stable_version == 1
    assert pointer(registry_copy)["rollout"]["percent"] == 10

    # Without a routing key: each request by weight. 2,000 requests within +-3 points of 10%.
    images = tiny_images(1)
    stub = pb_grpc.InferenceStub(server.channel())
    with ThreadPoolExecutor(4) as pool:
        versions = list(pool.map(lambda _: classify(server, images, stub=stub).version, range(2000)))
    share = 100 * versions.count(candidate) / len(versions)
    assert set(versions) == {1, candidate}
    assert 7 <= share <= 13, share
    live = figures(status(server))
    assert live["candidate"].requests == versions.count(candidate)
    assert live["stable"].requests == versions.count(1)
    assert live["candidate"].p99_ms > 0 and live["stable"].p50_ms > 0

    # With a routing key: one caller, one version throughout; across keys, both versions.
    seen = {}
    for i in range(60):
        key = f"user-{i}"
        answers = {classify(server, images, key=key, stub=stub).version for _ in range(4)}
        assert len(answers) == 1, (key, answers)
        seen[key] = answers.pop()
    assert set(seen.values()) == {1, candidate}

    # A request that names a version gets exactly that version.
    assert {classify(server, images, version=1, stub=stub).version for _ in range(30)} == {1}
    assert {classify(server, images, version=candidate, stub=stub).version for _ in range(10)} == {candidate}

    # KServe V2 too: split by weight, sticky with the routing-key metadata, the response names the version.
    client = tc.InferenceServerClient(url=server.target)
    pixels = np.random.default_rng(3).integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    tensor = tc.InferInput("image", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    kserve = [client.infer(TINY, [tensor]).get_response().model_version for _ in range(300)]
    assert set(kserve) == {"1", str(candidate)}
    assert 3 <= 100 * kserve.count(str(candidate)) / len(kserve) <= 20
    key = next(k for k, v in seen.items() if v == candidate)
    assert {client.infer(TINY, [tensor], headers={"routing-key": key}).get_response().model_version
            for _ in range(10)} == {str(candidate)}

    # The routing key is bounded: a longer one is a caller's mistake (INVALID_ARGUMENT), not hashed.
    with pytest.raises(grpc.RpcError) as refused:
        classify(server, images, key="k" * 257, stub=stub)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "routing-key" in refused.value.details()
    client.close()

    # REST (the same KServe V2 rules): split by weight, sticky with the routing-key header, bounded.
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    rest = th.InferenceServerClient(url=server.http_target)
    tensor = th.InferInput("image", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    over_rest = [rest.infer(TINY, [tensor]).get_response()["model_version"] for _ in range(300)]
    assert set(over_rest) == {"1", str(candidate)}
    assert {rest.infer(TINY, [tensor], headers={"routing-key": key}).get_response()["model_version"]
            for _ in range(10)} == {str(candidate)}
    with pytest.raises(InferenceServerException) as refused_rest:
        rest.infer(TINY, [tensor], headers={"routing-key": "k" * 257})
    assert refused_rest.value.status() == "400" and "routing-key" in refused_rest.value.message()
    rest.close()


# --- shadow -----------------------------------------------------------------------------------

def test_shadow_agreement_matches_a_direct_comparison(server_factory, registry_copy, tmp_path, photos):
    images = [photos[k] for k in ("chelsea", "coffee", "rocket", "astronaut")]
    server = server_factory(registry_copy, "--rollout-min-requests", "1000")
    before = classify(server, images, model=BUILTIN_NAME, version=1)
    top1 = [r.predictions[0].index for r in before.results]
    other = next(i for i in range(1000) if i not in top1)
    candidate = publish_swapped_builtin(registry_copy, tmp_path, (top1[0], other))  # chelsea's answer moves

    start(server, candidate, "shadow", 50, name=BUILTIN_NAME)
    # The direct comparison: both versions, named explicitly, on the same images.
    stable_top1 = [r.predictions[0].index
                   for r in classify(server, images, model=BUILTIN_NAME, version=1).results]
    candidate_top1 = [r.predictions[0].index
                      for r in classify(server, images, model=BUILTIN_NAME, version=candidate).results]
    agree_direct = sum(a == b for a, b in zip(stable_top1, candidate_top1))
    assert 0 < agree_direct < len(images)  # the swap changes some answers, not all

    stub = pb_grpc.InferenceStub(server.channel())
    for _ in range(24):
        answer = classify(server, images, model=BUILTIN_NAME, stub=stub)
        assert answer.version == 1  # the caller always gets stable's answer
        assert [r.predictions[0].index for r in answer.results] == stable_top1

    def settled() -> bool:
        live = figures(status(server, BUILTIN_NAME))["candidate"]
        return live.requests + live.dropped > 0 and not server_busy(server)

    time.sleep(1.0)
    wait_for(settled, 60, "shadow work")
    live = figures(status(server, BUILTIN_NAME))
    shadow = live["candidate"]
    # Explicitly named calls count for their version but are never mirrored: stable has 24 + 1.
    assert live["stable"].requests == 25
    assert shadow.compared > 0 and shadow.compared == len(images) * (shadow.requests - 1)
    assert shadow.agreed * len(images) == agree_direct * shadow.compared
    assert shadow.agreement == pytest.approx(agree_direct / len(images), abs=1e-4)

    # A mirrored request larger than one batch (--max-batch-size 8) is not run: dropped, counted.
    running = status(server, BUILTIN_NAME)
    rollout = Rollout(running.id, 1, candidate, "shadow", 50, False, None)  # the server's routing rule
    key = next(f"user-{i}" for i in range(100) if rollout.picks_candidate(f"user-{i}"))
    answer = classify(server, images * 3, model=BUILTIN_NAME, key=key)
    assert answer.version == 1 and len(answer.results) == 12
    after = figures(status(server, BUILTIN_NAME))
    assert after["candidate"].dropped == shadow.dropped + 1 and after["candidate"].requests == shadow.requests
    assert after["stable"].requests == live["stable"].requests + 1


def server_busy(server, name: str = BUILTIN_NAME) -> bool:
    """True while the candidate's shadow figures still change."""
    first = figures(status(server, name))["candidate"].requests
    time.sleep(0.5)
    return figures(status(server, name))["candidate"].requests != first


def test_shadow_work_is_bounded_and_drops_are_counted(server_factory, registry_copy, tmp_path):
    """A slow shadow candidate under concurrent load, with a one-request queue: every stable answer
    arrives, and every mirrored request is either run by the candidate or counted as dropped."""
    publish_tiny(registry_copy, tmp_path, 1, activate=True)
    slow = publish_tiny(registry_copy, tmp_path, 1, "slow")
    server = server_factory(registry_copy, "--rollout-shadow-queue", "1")
    running = start(server, slow, "shadow", 99, manual=True)
    rollout = Rollout(running.id, 1, slow, "shadow", 99, True, None)
    keys = [key for key in (f"user-{i}" for i in range(200)) if rollout.picks_candidate(key)][:8]
    stub = pb_grpc.InferenceStub(server.channel())
    images = tiny_images(1)

    def caller(key: str) -> list[int]:
        return [classify(server, images, key=key, stub=stub).version for _ in range(25)]

    with ThreadPoolExecutor(len(keys)) as pool:
        versions = [v for answers in pool.map(caller, keys) for v in answers]
    assert versions == [1] * 200  # every caller gets stable's answer
    wait_for(lambda: not server_busy(server, TINY), 60, "shadow work")
    live = figures(status(server))
    assert live["stable"].requests == 200
    assert live["candidate"].dropped > 0
    assert live["candidate"].requests + live["candidate"].dropped == 200
    assert live["candidate"].compared == live["candidate"].requests
    assert live["candidate"].agreed == live["candidate"].compared  # same weights: the same answers


# --- automatic decisions ----------------------------------------------------------------------

def drive_until_decided(server, timeout: float = 90, name: str = TINY) -> pb.RolloutStatus:
    """Send requests (from distinct routing keys) until the rollout ends; its final status."""
    stub = pb_grpc.InferenceStub(server.channel())
    images = tiny_images(1, seed=7)
    deadline = time.monotonic() + timeout
    i = 0
    while time.monotonic() < deadline:
        for _ in range(20):
            i += 1
            try:
                classify(server, images, key=f"caller-{i}", stub=stub)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.INTERNAL  # the failing candidate's answer
        current = status(server, name)
        if not current.running:
            return current
    raise AssertionError(f"no decision within {timeout} s: {status(server, name)}")


def audit_decisions(server) -> list[str]:
    return [line for line in server.log().splitlines() if "method=RolloutDecision" in line]


def test_bad_candidates_are_rolled_back_and_a_good_one_promoted(server_factory, registry_copy, tmp_path):
    publish_tiny(registry_copy, tmp_path, 1, activate=True)
    failing = publish_tiny(registry_copy, tmp_path, 1, "error")
    slow = publish_tiny(registry_copy, tmp_path, 1, "slow")
    good = publish_tiny(registry_copy, tmp_path, 1)
    server = server_factory(registry_copy, "--rollout-min-requests", "30", "--poll-interval-s", "0.2")

    # A candidate that answers errors.
    start(server, failing, "canary", 50)
    ended = drive_until_decided(server)
    assert ended.outcome == "rolled_back" and ended.candidate_version == failing
    decision = ended.events[-1]
    assert "FAILED error rate 1.0000" in decision.what, decision.what
    decided = json.loads(decision.figures_json)
    assert decided["candidate"]["errors"] == decided["candidate"]["requests"] >= 30
    assert pointer(registry_copy)["version"] == 1 and "rollout" not in pointer(registry_copy)
    assert classify(server, tiny_images(1)).version == 1
    line = audit_decisions(server)[-1]
    assert "result=rolled_back" in line and f"version={failing}" in line and "error rate 1.0000" in line

    # A candidate made slow on purpose.
    start(server, slow, "canary", 50)
    ended = drive_until_decided(server)
    assert ended.outcome == "rolled_back", ended.events[-1].what
    what = ended.events[-1].what
    assert re.search(r"FAILED p99 [\d.]+ ms vs stable [\d.]+ ms x 1.5", what), what
    decided = json.loads(ended.events[-1].figures_json)
    assert decided["candidate"]["p99_ms"] > 1.5 * decided["stable"]["p99_ms"]
    assert "p99" in audit_decisions(server)[-1] and "result=rolled_back" in audit_decisions(server)[-1]
    assert pointer(registry_copy)["version"] == 1

    # A good candidate (the same weights as stable) is promoted: it becomes the active version.
    start(server, good, "canary", 50)
    ended = drive_until_decided(server)
    assert ended.outcome == "promoted", ended.events[-1].what
    assert "passed error rate" in ended.events[-1].what and "passed p99" in ended.events[-1].what
    state = pointer(registry_copy)
    assert state["version"] == good and state["history"][-1] == 1 and state["last_rollout"]["outcome"] == "promoted"
    wait_for(lambda: classify(server, tiny_images(1)).version == good, 10, "promoted version answering")
    assert "result=promoted" in audit_decisions(server)[-1]
    # The CLI shows the last rollout with its events.
    shown = run_cli("rollout", "status", TINY, "--target", server.target).stdout
    assert f"rollout of version {good} beside version 1: canary 50%, promoted" in shown
    assert "event: promoted after" in shown


# --- replicas ---------------------------------------------------------------------------------

def test_two_replicas_follow_one_rollout(server_factory, registry_copy, tmp_path):
    publish_tiny(registry_copy, tmp_path, 1, activate=True)
    candidate = publish_tiny(registry_copy, tmp_path, 2)
    first = server_factory(registry_copy, "--poll-interval-s", "0.2")
    second = server_factory(registry_copy, "--poll-interval-s", "0.2")
    images = tiny_images(1)

    def answers(server, count: int = 40) -> set[int]:
        return {classify(server, images).version for _ in range(count)}

    assert answers(first, 2) == answers(second, 2) == {1}
    start(first, candidate, "canary", 50, manual=True)
    wait_for(lambda: answers(second) == {1, candidate}, 20, "the second replica to follow the rollout")
    assert status(second).running and status(second).candidate_version == candidate
    assert answers(first) == {1, candidate}

    # Abort through the second: both go back to stable only.
    aborted = models(second).AbortRollout(pb.RolloutRequest(name=TINY), timeout=30)
    assert not aborted.running and aborted.outcome == "aborted"
    wait_for(lambda: answers(first) == {1}, 20, "the first replica to see the abort")
    assert answers(second) == {1} and not status(first).running

    # Start through the second, promote through the first: both answer with the candidate.
    start(second, candidate, "canary", 50, manual=True)
    wait_for(lambda: status(first).running and answers(first) == {1, candidate}, 20, "the new rollout")
    promoted = models(first).PromoteRollout(pb.RolloutRequest(name=TINY), timeout=30)
    assert promoted.outcome == "promoted"
    wait_for(lambda: answers(second) == {candidate}, 20, "the second replica to see the promotion")
    assert answers(first) == {candidate}
    assert pointer(registry_copy)["version"] == candidate


# --- crash safety -----------------------------------------------------------------------------

def consistent(registry_dir: Path) -> dict:
    """The pointer parses and names stored versions; a rollout in it is whole."""
    state = pointer(registry_dir)
    stored = Registry(registry_dir).versions(TINY)
    assert state["version"] in stored
    if "rollout" in state:
        rollout = state["rollout"]
        assert rollout["candidate"] in stored and rollout["stable"] == state["version"]
        assert rollout["mode"] == "canary" and rollout["percent"] == 50 and rollout["rules"]["min_requests"] >= 1
    return state


def test_kill_9_while_a_rollout_starts_or_ends_leaves_the_pointer_consistent(server_factory, registry_copy,
                                                                             tmp_path):
    publish_tiny(registry_copy, tmp_path, 1, activate=True)
    candidate = publish_tiny(registry_copy, tmp_path, 2)
    outcomes = set()
    for attempt in range(3):
        server = server_factory(registry_copy)
        classify(server, tiny_images(1))  # tiny is loaded: StartRollout only loads the candidate and writes
        running = "rollout" in pointer(registry_copy)
        stub = models(server)
        call = (stub.PromoteRollout.future(pb.RolloutRequest(name=TINY), timeout=30) if running else
                stub.StartRollout.future(pb.StartRolloutRequest(name=TINY, version=candidate, mode="canary",
                                                                percent=50, manual=True), timeout=30))
        time.sleep(random.uniform(0.0, 0.05))
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        state = consistent(registry_copy)
        outcomes.add(("rollout" in state, state["version"]))
        if state["version"] == candidate:  # promoted before the kill: nothing left to end
            break
    # A server started on what the kills left serves, and the rollout can be ended or started cleanly.
    server = server_factory(registry_copy)
    state = consistent(registry_copy)
    answer = classify(server, tiny_images(1))
    assert answer.version in (1, candidate)
    if "rollout" in state:
        models(server).AbortRollout(pb.RolloutRequest(name=TINY), timeout=30)
        assert "rollout" not in consistent(registry_copy)
    assert outcomes


# --- bad input --------------------------------------------------------------------------------

def test_bad_rollout_requests_get_a_clear_status_and_change_nothing(server_factory, registry_copy, tmp_path):
    publish_tiny(registry_copy, tmp_path, 1, activate=True)
    candidate = publish_tiny(registry_copy, tmp_path, 2)
    publish_tiny(registry_copy, tmp_path, 1, name="dark")  # stored, never activated
    server = server_factory(registry_copy)
    stub = models(server)

    def refused(code: grpc.StatusCode, words: str, call, request) -> None:
        before = {p: p.read_bytes() for p in registry_copy.glob("*/active.json")}
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=30)
        assert err.value.code() == code, err.value.details()
        assert words in err.value.details(), err.value.details()
        assert {p: p.read_bytes() for p in registry_copy.glob("*/active.json")} == before
        assert not (registry_copy / "dark" / "active.json").exists()

    def request(**fields) -> pb.StartRolloutRequest:
        return pb.StartRolloutRequest(**{"name": TINY, "version": candidate, "mode": "canary", "percent": 10,
                                         **fields})

    refused(grpc.StatusCode.NOT_FOUND, "has no version 99", stub.StartRollout, request(version=99))
    refused(grpc.StatusCode.INVALID_ARGUMENT, "positive version", stub.StartRollout, request(version=0))
    for percent in (0, 100, -5, 1000):
        refused(grpc.StatusCode.INVALID_ARGUMENT, "from 1 to 99", stub.StartRollout, request(percent=percent))
    refused(grpc.StatusCode.INVALID_ARGUMENT, "canary or shadow", stub.StartRollout, request(mode="blue"))
    refused(grpc.StatusCode.INVALID_ARGUMENT, "already the active version", stub.StartRollout, request(version=1))
    refused(grpc.StatusCode.FAILED_PRECONDITION, "none is active yet", stub.StartRollout,
            request(name="dark", version=1))
    refused(grpc.StatusCode.NOT_FOUND, "unknown model", stub.StartRollout, request(name="nothing-here", version=1))
    refused(grpc.StatusCode.INVALID_ARGUMENT, "invalid model name", stub.StartRollout, request(name="Bad/Name"))
    refused(grpc.StatusCode.FAILED_PRECONDITION, "no rollout in progress", stub.PromoteRollout,
            pb.RolloutRequest(name=TINY))
    refused(grpc.StatusCode.FAILED_PRECONDITION, "no rollout in progress", stub.AbortRollout,
            pb.RolloutRequest(name=TINY))
    refused(grpc.StatusCode.NOT_FOUND, "unknown model", stub.GetRollout, pb.RolloutRequest(name="nothing-here"))

    start(server, candidate, "canary", 10, manual=True)
    refused(grpc.StatusCode.FAILED_PRECONDITION, "already has a rollout of version", stub.StartRollout,
            request(mode="shadow"))
    refused(grpc.StatusCode.FAILED_PRECONDITION, "rollout of version", models(server).ActivateModel,
            pb.ActivateModelRequest(name=TINY, version=candidate))
    refused(grpc.StatusCode.FAILED_PRECONDITION, "rollout of version", models(server).RollbackModel,
            pb.RollbackModelRequest(name=TINY))
    assert "INTERNAL" not in server.log() and "Traceback" not in server.log()

    # The CLI refuses a missing or doubled mode and an out-of-range percentage before calling.
    for args in ((), ("--canary", "10", "--shadow", "10"), ("--canary", "0"), ("--shadow", "100")):
        result = run_cli("rollout", "start", TINY, str(candidate), *args, "--target", server.target, check=False)
        assert result.returncode == 2, result.stderr


# --- FineTune ---------------------------------------------------------------------------------

def test_finetune_can_start_its_version_as_a_rollout(server_factory, registry_copy):
    from sklearn.datasets import load_digits

    from test_finetune import digit_png, stream, watch

    digits = load_digits()
    examples = [(digit_png(image), str(label)) for image, label in zip(digits.images[:90], digits.target[:90])
                if label < 3]
    server = server_factory(registry_copy)
    training = pb_grpc.TrainingStub(server.channel())

    def finetune(**options) -> pb.Job:
        config = pb.FineTuneConfig(name="digits-roll", epochs=3, seed=0, activate=True, **options)
        job_id = training.FineTune(stream(config, examples), timeout=300).job_id
        watch(server, job_id, timeout=300)
        return training.GetJob(pb.GetJobRequest(job_id=job_id), timeout=30)

    with pytest.raises(grpc.RpcError) as err:  # checked before anything is uploaded or trained
        training.FineTune(stream(pb.FineTuneConfig(name="digits-roll", rollout_mode="canary", rollout_percent=100),
                                 examples), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "rollout_percent" in err.value.details()

    first = finetune(rollout_mode="canary", rollout_percent=30)  # nothing to roll out against: activated
    assert first.state == pb.JOB_STATE_SUCCEEDED and pointer(registry_copy, "digits-roll")["version"] == first.version
    second = finetune(rollout_mode="shadow", rollout_percent=30)
    assert second.state == pb.JOB_STATE_SUCCEEDED, second.error
    rollout = status(server, "digits-roll")
    assert rollout.running and rollout.mode == "shadow" and rollout.percent == 30
    assert rollout.candidate_version == second.version and rollout.stable_version == first.version
    assert f"fine-tune job {second.job_id}" in rollout.events[0].what
    assert pointer(registry_copy, "digits-roll")["version"] == first.version


# --- authentication: sticky per credential, admin scope ---------------------------------------

def test_split_sticks_to_the_credential_and_rollouts_need_admin(server_factory, registry_copy, tmp_path):
    import urllib.request

    from headswap.security.credentials import token_sha256

    publish_tiny(registry_copy, tmp_path, 1, activate=True)
    candidate = publish_tiny(registry_copy, tmp_path, 2)
    users = {f"user-{i}": f"token-for-user-{i}" for i in range(24)}
    entries = [{"name": name, "token_sha256": token_sha256(token), "scopes": ["classify"]}
               for name, token in users.items()]
    entries.append({"name": "ops", "token_sha256": token_sha256("ops-token"), "scopes": ["admin"]})
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(entries))
    server = server_factory(registry_copy, "--auth-tokens-file", str(tokens))
    stub, admin = pb_grpc.InferenceStub(server.channel()), (("authorization", "Bearer ops-token"),)
    images = tiny_images(1)

    for method, request in ((models(server).StartRollout, pb.StartRolloutRequest(name=TINY, version=candidate,
                                                                                  mode="canary", percent=50)),
                            (models(server).GetRollout, pb.RolloutRequest(name=TINY)),
                            (models(server).AbortRollout, pb.RolloutRequest(name=TINY))):
        with pytest.raises(grpc.RpcError) as err:
            method(request, timeout=30, metadata=(("authorization", "Bearer token-for-user-0"),))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "admin" in err.value.details()
    assert "rollout" not in pointer(registry_copy)

    models(server).StartRollout(pb.StartRolloutRequest(name=TINY, version=candidate, mode="canary", percent=50,
                                                       manual=True), timeout=60, metadata=admin)
    seen = {}
    for name, token in users.items():
        auth = (("authorization", f"Bearer {token}"),)
        answers = {stub.Classify(pb.ClassifyRequest(images=images, model=TINY), timeout=30, metadata=auth).version
                   for _ in range(4)}
        assert len(answers) == 1, (name, answers)
        seen[name] = answers.pop()
    assert set(seen.values()) == {1, candidate}
    # A routing-key entry wins over the credential: a caller speaking for its end users.
    first = next(iter(users.values()))
    keyed = {stub.Classify(pb.ClassifyRequest(images=images, model=TINY), timeout=30,
                           metadata=(("authorization", f"Bearer {first}"), ("routing-key", f"end-user-{i}"))).version
             for i in range(30)}
    assert keyed == {1, candidate}
    assert re.search(r"audit who=ops via=token method=StartRollout .*result=OK model=tiny version=2", server.log())

    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    for version, role in ((1, "stable"), (candidate, "candidate")):
        count = 4 * list(seen.values()).count(version)  # each user's four calls
        line = f'headswap_rollout_requests_total{{model="tiny",role="{role}",version="{version}"}}'
        assert line in text, text[-2000:]
        assert float(text.split(line, 1)[1].split()[0]) >= count


# --- the decision rules and the routing hash (pure logic) -------------------------------------

def test_decision_rules_name_the_figures_that_decided():
    from headswap.inference.rollout import Rules, decide

    rules = Rules(min_requests=100, error_margin=0.02, p99_factor=1.5, agreement_floor=0.9)

    def figures_of(requests=100, errors=0, p99=10.0, compared=0, agreed=0) -> dict:
        return {"requests": requests, "errors": errors, "error_rate": errors / requests if requests else 0.0,
                "p50_ms": p99 / 2, "p99_ms": p99, "compared": compared, "agreed": agreed,
                "agreement": agreed / compared if compared else 0.0, "dropped": 0}

    canary = Rollout("r1", 1, 2, "canary", 10, False, rules)
    stable = figures_of(900, errors=9, p99=10.0)  # 1% errors
    assert decide(canary, stable, figures_of(99)) is None
    assert decide(canary, stable, figures_of(100, errors=3, p99=14.9)).outcome == "promoted"  # 3% <= 1% + 2%
    failed = decide(canary, stable, figures_of(100, errors=4, p99=10.0))
    assert failed.outcome == "rolled_back"
    assert "FAILED error rate 0.0400 vs stable 0.0100 + margin 0.02" in failed.reason
    slow = decide(canary, stable, figures_of(100, p99=15.1))
    assert slow.outcome == "rolled_back" and "FAILED p99 15.10 ms vs stable 10.00 ms x 1.5 = 15.00 ms" in slow.reason
    assert slow.figures["candidate"]["p99_ms"] == 15.1 and slow.figures["rules"]["p99_factor"] == 1.5

    shadow = Rollout("r2", 1, 2, "shadow", 50, False, rules)
    assert decide(shadow, stable, figures_of(100, compared=400, agreed=360)).outcome == "promoted"
    low = decide(shadow, stable, figures_of(100, compared=400, agreed=359))
    assert low.outcome == "rolled_back" and "FAILED top-1 agreement 0.8975 (359/400 images) vs floor 0.9" in low.reason


def test_routing_hash_is_sticky_and_splits_by_the_percentage():
    rollout = Rollout("abc", 1, 2, "canary", 10, False, None)
    keys = [f"caller-{i}" for i in range(10_000)]
    picked = [rollout.picks_candidate(key) for key in keys]
    assert picked == [rollout.picks_candidate(key) for key in keys]
    assert 9.0 <= 100 * sum(picked) / len(keys) <= 11.0
    other = Rollout("def", 1, 2, "canary", 10, False, None)  # another rollout: another draw of callers
    assert [other.picks_candidate(key) for key in keys] != picked


KILLED_WRITER = """
import os, signal, sys
from headswap.inference.rollout import Rollout, Rules
from headswap.registry import store
from headswap.registry.registry import Registry

root, step, action = sys.argv[1], sys.argv[2], sys.argv[3]
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
real_replace = os.replace
if step == "before-rename":  # the new pointer is written and synced under its temporary name
    store.os.replace = lambda src, dst: die() if str(dst).endswith("active.json") else real_replace(src, dst)
elif step == "after-rename":
    store.os.replace = lambda src, dst: (real_replace(src, dst), die() if str(dst).endswith("active.json") else 0)
registry = Registry(root)
if step == "while-deciding":  # inside the update, the lock held, nothing written yet
    update_state = registry.update_state
    registry.update_state = lambda name, change: update_state(name, lambda state: die() or change(state))
rules = Rules(100, 0.02, 1.5, 0.9)
make = lambda stable: Rollout.new(stable, 2, "canary", 50, True, rules, "killed-writer").to_dict()
if action == "start":
    registry.start_rollout("tiny", 2, make)
else:
    registry.end_rollout("tiny", action == "promote", action, {"what": "killed"})
"""


@pytest.mark.parametrize("step", ["while-deciding", "before-rename", "after-rename"])
def test_a_writer_killed_at_each_step_of_the_pointer_update_leaves_it_whole(registry_copy, tmp_path, step):
    """SIGKILL inside the conditional update: while the change is computed (lock held), after the new
    pointer is written but before it is renamed into place, and right after: the pointer is the old
    one or the new one, whole, and the next writer is not blocked by the dead one's lock."""
    import subprocess
    import sys

    publish_tiny(registry_copy, tmp_path, 1, activate=True)
    publish_tiny(registry_copy, tmp_path, 2)
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    for action in ("start", "promote"):
        before = pointer(registry_copy)
        if action == "promote" and "rollout" not in before:  # the killed start left none: start one whole
            Registry(registry_copy).start_rollout(TINY, 2, lambda stable: {
                "id": "whole", "stable": stable, "candidate": 2, "mode": "canary", "percent": 50, "manual": True,
                "rules": {"min_requests": 100, "error_margin": 0.02, "p99_factor": 1.5, "agreement_floor": 0.9}})
            before = pointer(registry_copy)
        result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(registry_copy), step, action], env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == -signal.SIGKILL, result.stderr
        after = consistent(registry_copy)
        if step == "after-rename":
            assert after != before and (("rollout" in after) if action == "start" else after["version"] == 2)
        else:
            assert after == before
    # The dead writers' lock is gone: an ordinary update goes through at once.
    Registry(registry_copy).update_state(TINY, lambda state: dict(state, checked=True))
    assert pointer(registry_copy)["checked"] is True
