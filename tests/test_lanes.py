"""Inference lanes: batches side by side on separate ONNX Runtime sessions under concurrent load,
a lone request on every thread with the other lanes held back."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import BUILTIN_NAME
from headswap.config import Settings
from headswap import metrics
from headswap.inference.batcher import Batcher, batch_sizes
from headswap.protocol import headswap_v1_pb2 as pb
from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc


def one_image(tag: float) -> np.ndarray:
    return np.full((1, 1), tag, dtype=np.float32)


def test_queued_batches_run_side_by_side_and_a_lone_one_holds_every_lane():
    release_lone = threading.Event()
    both_lanes = threading.Barrier(2, timeout=10)  # passes only if two lanes run at the same moment
    calls: list[tuple[str, list[float]]] = []

    def lone(batch: np.ndarray) -> np.ndarray:
        calls.append(("lone", batch[:, 0].tolist()))
        release_lone.wait(10)
        return np.zeros((len(batch), 2), dtype=np.float32)

    def lane(name: str):
        def infer(batch: np.ndarray) -> np.ndarray:
            calls.append((name, batch[:, 0].tolist()))
            both_lanes.wait()
            return np.ones((len(batch), 2), dtype=np.float32)
        return infer

    batcher = Batcher([lane("lane0"), lane("lane1")], "lanes-test", max_batch=8, timeout_s=0.0, max_queue=100,
                      infer_lone=lone)
    try:
        first = batcher.submit(one_image(0), announced=False)  # nothing else: runs alone, on every thread
        for _ in range(100):
            if calls:
                break
            threading.Event().wait(0.01)
        later = [batcher.submit(one_image(tag), announced=False) for tag in (1, 2, 3)]
        threading.Event().wait(0.2)
        assert [name for name, _ in calls] == ["lone"]  # no lane started beside the lone run
        release_lone.set()
        assert first.result(10).sum() == 0
        for future in later:
            assert future.result(10).sum() == 2  # ran on a lane
    finally:
        batcher.close()
    lanes_used = sorted(name for name, _ in calls[1:])
    assert lanes_used == ["lane0", "lane1"], calls  # the queue was shared between the idle lanes
    assert sorted(tag for _, tags in calls[1:] for tag in tags) == [1.0, 2.0, 3.0]


def late_batch_sizes(lane, sizes: list[int], label: str, **options) -> list[int]:
    """1200 one-image requests through two copies of `lane` (which appends each batch's size to
    `sizes` and answers each row doubled): every image gets its own row back; returns the sizes of
    the later half of the batches, once the choice has settled."""
    batcher = Batcher([lane, lane], label, max_batch=8, timeout_s=0.0, max_queue=2000, **options)
    try:
        futures = [batcher.submit(one_image(tag), announced=False) for tag in range(1200)]
        for tag, future in enumerate(futures):
            assert future.result(60).tolist() == [[tag, tag]]
    finally:
        batcher.close()
    return sizes[len(sizes) // 2:]


def test_lanes_take_the_batch_size_that_measures_cheapest_per_image():
    """A lane whose images cost least in batches of 2 (as on a machine whose cache favours small
    batches): with a long queue, the lanes settle on batches of 2, while still trying 1, 4 and 8 now
    and then; every image is answered with its own row."""
    per_image_s = {1: 0.004, 2: 0.001, 4: 0.003, 8: 0.003}
    sizes: list[int] = []

    def lane(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        threading.Event().wait(per_image_s.get(len(batch), 0.003) * len(batch))
        return np.repeat(batch, 2, axis=1)

    assert batch_sizes(8) == [8, 4, 2, 1] and batch_sizes(6) == [6, 4, 2, 1] and batch_sizes(1) == [1]
    late = late_batch_sizes(lane, sizes, "batch-size-test")
    assert late.count(2) >= 0.8 * len(late), sizes
    assert {1, 4, 8} <= set(late), "the other sizes are still probed"
    assert metrics.BATCH_CAP.labels("batch-size-test")._value.get() in (1, 2, 4, 8)


@pytest.mark.parametrize("cpu_timed", [True, False], ids=["cpu-time", "wall-time"])
def test_batch_sizes_are_compared_by_cpu_time_where_a_lane_runs_on_its_own_thread(cpu_timed):
    """Batches of 2 take long (they wait, as a lane preempted on a busy machine does) but cost no CPU;
    the other sizes cost CPU. Timed by the lane thread's CPU (one-thread ONNX Runtime lanes), 2 wins;
    by wall time (lanes whose work runs on other threads), it loses."""
    sizes: list[int] = []

    def lane(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        if len(batch) == 2:
            threading.Event().wait(0.004 * len(batch))
        else:
            end = time.thread_time() + 0.0005 * len(batch)
            while time.thread_time() < end:
                pass
        return np.repeat(batch, 2, axis=1)

    late = late_batch_sizes(lane, sizes, f"cpu-timed-{cpu_timed}", cpu_timed=cpu_timed)
    if cpu_timed:
        assert late.count(2) >= 0.8 * len(late), sizes
    else:
        assert late.count(2) <= 0.2 * len(late), sizes


def test_lane_count_follows_threads_and_is_bounded():
    assert Settings(threads=2).lanes == 2
    assert Settings(threads=2, inference_lanes=8).lanes == 2  # never more lanes than threads
    assert Settings(threads=16).lanes == 4  # automatic: at most 4 copies of a model
    assert Settings(threads=16, inference_lanes=1).lanes == 1
    with pytest.raises(ValueError, match="--inference-lanes must not be negative"):
        Settings(inference_lanes=-1).validate()


@pytest.mark.parametrize("lanes", ["1", "2"])
def test_server_answers_the_same_with_one_or_two_lanes(server_factory, registry_copy, photos, lanes):
    server = server_factory(registry_copy, "--threads", "2", "--inference-lanes", lanes)
    stub = pb_grpc.InferenceStub(server.channel())
    request = pb.ClassifyRequest(images=[photos["chelsea"], photos["coffee"]], top_k=1)

    def classify(_: int) -> tuple[int, int]:
        response = stub.Classify(request, timeout=60)
        assert response.model == BUILTIN_NAME
        return response.results[0].predictions[0].index, response.results[1].predictions[0].index

    with ThreadPoolExecutor(8) as pool:  # concurrent: batches on both lanes
        answers = set(pool.map(classify, range(48)))
    assert len(answers) == 1
    (cat, espresso), = answers
    assert cat in range(281, 286) and espresso == 967
    assert f"({lanes} inference lane{'' if lanes == '1' else 's'})" in server.log()
    assert "Traceback" not in server.log()
