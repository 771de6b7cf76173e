"""RankForLabelling (issue 23): which unlabelled images to label next.

Unit tests of the ranking (pure numpy), then the real server: a model fine-tuned on real digits
through FineTune, asked to rank real digits (some it was trained on, some re-encoded copies of
others), with authentication on; the bounds; `headswap rank FOLDER`.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
from PIL import Image

from conftest import BUILTIN_NAME, ServerProcess, run_cli, start_server
from headswap.client import Client, PermissionDeniedError
from headswap.inference import ranking
from headswap.protocol import headswap_v1_pb2 as pb
from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc
from headswap.registry import training_set
from headswap.registry.registry import Registry
from headswap.security.credentials import ADMIN, CLASSIFY, TRAIN, token_sha256
from test_finetune import digit_png, stream, watch

TOKENS = {"ops": ("rank-admin-token-1", [ADMIN, CLASSIFY, TRAIN]), "web": ("rank-classify-token-2", [CLASSIFY]),
          "pipeline": ("rank-train-token-3", [TRAIN])}
MODEL = "digits-rank"
MAX_IMAGES, MAX_TOP, MAX_PIXELS = 48, 16, 1_000_000


def bearer(name: str) -> tuple:
    return (("authorization", f"Bearer {TOKENS[name][0]}"),)


# --- the ranking itself -------------------------------------------------------------------------


def test_uncertainty_margin_and_entropy():
    p = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    assert np.allclose(ranking.uncertainty(p, "margin"), [0.0, 1.0, 0.7, 1.0])
    entropy = ranking.uncertainty(p, "entropy")
    assert entropy[0] == pytest.approx(0.0, abs=1e-9) and entropy[3] == pytest.approx(1.0)
    assert entropy[0] < entropy[1] < entropy[2] < entropy[3]  # entropy counts the third class; margin does not
    with pytest.raises(ValueError, match="uncertainty must be one of"):
        ranking.uncertainty(p, "least")


def test_far_apart_images_rank_by_uncertainty():
    """With every image equally far from every other, diversity cannot tell them apart: the order
    is the uncertainty order, for both measures."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(12, 5)) * 3
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    embeddings = np.eye(12, 32) * 5.0  # orthogonal: all pairwise distances equal once normalised
    for method in ranking.UNCERTAINTIES:
        u = ranking.uncertainty(p, method)
        result = ranking.rank(p, embeddings, top=12, method=method)
        assert result.order == list(np.argsort(-u, kind="stable")), method
        assert result.duplicates == 0


def test_typical_images_come_before_outliers():
    """Equally uncertain and equally far from what is labelled: an image from a dense group of
    similar images is picked before a lone outlier (one label there teaches about many images)."""
    rng = np.random.default_rng(2)
    labelled_centre = np.zeros(16)
    labelled_centre[0] = 1.0
    group = np.zeros(16)
    group[1] = 1.0
    outlier = np.zeros(16)
    outlier[2] = 1.0
    embeddings = np.stack([labelled_centre, outlier, *[group + rng.normal(scale=0.05, size=16) for _ in range(12)]])
    p = np.tile([0.5, 0.5], (len(embeddings), 1))  # every image equally uncertain
    labelled = np.zeros(len(embeddings), dtype=bool)
    labelled[0] = True
    typical = ranking.typicality(ranking.normalized(embeddings))
    assert typical[2:].min() > typical[1]  # the group is denser than the outlier
    order = ranking.rank(p, embeddings, top=2, labelled=labelled).order
    assert order[0] >= 2 and 1 in order  # a group image first; the outlier still covers new ground second
    assert ranking.typicality(ranking.normalized(np.eye(12, 32))).tolist() == [1.0] * 12  # all alike: no weighting


def test_near_duplicates_are_never_both_in_the_top():
    """Five clusters of near-identical images, the most uncertain images all in one cluster:
    uncertainty alone would return that cluster; the ranking takes one image per cluster first,
    and never two of the same cluster."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(5, 64))
    cluster = np.repeat(np.arange(5), 6)
    embeddings = centres[cluster] + rng.normal(scale=0.01, size=(30, 64))
    u_wanted = np.where(cluster == 0, 0.95, 0.3) + rng.uniform(0, 0.02, size=30)
    p = np.stack([(2 - u_wanted) / 2, u_wanted / 2], axis=1)  # margin uncertainty == u_wanted
    result = ranking.rank(p, embeddings, top=10)
    chosen = cluster[result.order]
    assert cluster[result.order[0]] == 0  # the most uncertain first
    assert sorted(chosen) == [0, 1, 2, 3, 4]  # only five distinct images exist: no duplicate fills the top
    assert result.duplicates == 25
    # already labelled images are never chosen, and their near-duplicates are left out too
    labelled = cluster == 0
    result = ranking.rank(p, embeddings, top=10, labelled=labelled)
    assert sorted(cluster[result.order]) == [1, 2, 3, 4]


def test_training_set_file_round_trip(tmp_path):
    images = [b"a", b"b", b"c", b"a"]
    digests = training_set.digests_of(images)
    # a digest ending in zero bytes must survive (fixed-width strings drop trailing NULs when shown)
    zero_tail = np.array([bytes(31) + b"\x00", b"\x01" * 30 + b"\x00\x00"], dtype="S32")
    path = tmp_path / training_set.TRAINING_SET_FILE
    assert training_set.write(path, np.concatenate([digests, zero_tail])) == 5
    assert path.stat().st_size == 5 * 32
    loaded = training_set.load(path)
    probe = np.concatenate([training_set.digests_of([b"c", b"d"]), zero_tail,
                            np.array([b"\x01" * 30 + b"\x00\x01"], dtype="S32")])
    assert loaded.contains(probe).tolist() == [True, False, True, True, False]


# --- through the real server --------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> dict[str, list]:
    """Real digits as PNGs: 60 to fine-tune on, 40 unseen ones."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(3).permutation(len(data.target))
    pick = lambda idx: [(digit_png(data.images[i]), str(data.target[i])) for i in idx]  # noqa: E731
    train = [i for c in range(10) for i in order[data.target[order] == c][:6]]
    unseen = [i for i in order if i not in set(train)][:40]
    return {"train": pick(train), "unseen": pick(unseen)}


def jpeg_copy(png: bytes) -> bytes:
    """The same picture re-encoded: other bytes (another sha256), a near-duplicate to the model."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def rank_server(exported_registry, tmp_path_factory, digits) -> Iterator[tuple[ServerProcess, Path]]:
    """A server with tokens and tight bounds, holding a model fine-tuned on `digits['train']`."""
    work = tmp_path_factory.mktemp("rank")
    registry = work / "registry"
    shutil.copytree(exported_registry, registry)
    tokens = work / "tokens.json"
    tokens.write_text(json.dumps([{"name": name, "token_sha256": token_sha256(token), "scopes": scopes}
                                  for name, (token, scopes) in TOKENS.items()]))
    server = start_server(registry, work / "server", "--auth-tokens-file", str(tokens),
                          "--max-images-per-request", str(MAX_IMAGES), "--max-rank-top", str(MAX_TOP),
                          "--max-image-pixels", str(MAX_PIXELS), "--max-ranking-calls", "1")
    job = pb_grpc.TrainingStub(server.channel()).FineTune(
        stream(pb.FineTuneConfig(name=MODEL, epochs=30, activate=True, seed=1), digits["train"]),
        metadata=bearer("ops"), timeout=600)
    final = list(pb_grpc.TrainingStub(server.channel()).WatchJob(pb.WatchJobRequest(job_id=job.job_id),
                                                                 metadata=bearer("ops"), timeout=600))[-1]
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.message
    yield server, registry
    server.stop()


def rank(server: ServerProcess, images: list[bytes], top: int = 0, model: str = MODEL, who: str = "web",
         **fields) -> pb.RankForLabellingResponse:
    return pb_grpc.InferenceStub(server.channel()).RankForLabelling(
        pb.RankForLabellingRequest(images=images, model=model, top=top, **fields), metadata=bearer(who), timeout=120)


def test_version_records_its_training_images(rank_server, digits):
    _, registry_dir = rank_server
    registry = Registry(registry_dir)
    manifest = registry.manifest(MODEL, 1)
    assert manifest["training_set"] == {"file": training_set.TRAINING_SET_FILE, "images": len(digits["train"])}
    files = registry.verified_extra_files(MODEL, 1, manifest)
    stored = training_set.load(files[training_set.TRAINING_SET_FILE])
    assert stored.contains(training_set.digests_of([image for image, _ in digits["train"]])).all()
    assert not stored.contains(training_set.digests_of([image for image, _ in digits["unseen"]])).any()


def test_rank_marks_training_images_honours_top_and_drops_near_duplicates(rank_server, digits):
    server, _ = rank_server
    unseen = [image for image, _ in digits["unseen"][:24]]
    copies = [jpeg_copy(image) for image in unseen[:8]]  # indices 24..31 are copies of 0..7
    trained = [image for image, _ in digits["train"][:8]]  # indices 32..39
    response = rank(server, unseen + copies + trained, top=12)
    assert response.model == MODEL and response.version == 1 and response.uncertainty == "margin"
    assert response.training_set_known and response.training_set_size == len(digits["train"])
    recommended = [image for image in response.images if image.rank > 0]
    assert [image.rank for image in recommended] == list(range(1, 13))
    indices = [image.index for image in recommended]
    assert len(set(indices)) == 12 and all(0 <= i < 32 for i in indices)  # never an image it was trained on
    for original in range(8):  # an image and its re-encoded copy are never both recommended
        assert not {original, original + 24} <= set(indices), (original, indices)
    assert response.near_duplicates >= 1
    already = [image for image in response.images if image.already_labelled]
    assert sorted(image.index for image in already) == list(range(32, 40)) and {i.rank for i in already} == {0}
    classes = {label for _, label in digits["train"]}
    assert all(0.0 <= image.uncertainty <= 1.0 and image.predicted_label in classes for image in response.images)


def test_first_pick_is_the_most_uncertain_as_classify_sees_it(rank_server, digits):
    """Without labelled images, rank 1 is the image whose top two classes (from Classify) are closest."""
    server, _ = rank_server
    images = [image for image, _ in digits["unseen"][:30]]
    response = rank(server, images, top=5, who="ops")
    classified = pb_grpc.InferenceStub(server.channel()).Classify(
        pb.ClassifyRequest(images=images, model=MODEL, top_k=2), metadata=bearer("web"), timeout=120)
    margins = np.array([1 - (r.predictions[0].score - r.predictions[1].score) for r in classified.results])
    first = response.images[0]
    assert first.rank == 1 and first.index == int(np.argmax(margins))
    assert first.uncertainty == pytest.approx(margins[first.index], abs=1e-4)
    assert first.predicted_label == classified.results[first.index].predictions[0].label
    entropy = rank(server, images, top=3, uncertainty="entropy")
    assert entropy.uncertainty == "entropy" and len([i for i in entropy.images if i.rank]) == 3


def test_zero_shot_model_has_no_training_set(rank_server, digits):
    server, _ = rank_server
    response = rank(server, [image for image, _ in digits["train"][:6]], top=3, model=BUILTIN_NAME)
    assert not response.training_set_known and response.training_set_size == 0
    assert not any(image.already_labelled for image in response.images) and len(response.images) == 3


@pytest.mark.parametrize("case", ["too many images", "oversized image", "top too large", "bad uncertainty",
                                  "unknown model", "bad model name", "no images", "not an image", "deadline",
                                  "message too large"])
def test_bounds_are_refused_with_clear_statuses(rank_server, digits, case):
    server, _ = rank_server
    image = digits["unseen"][0][0]
    big = io.BytesIO()
    Image.new("RGB", (1100, 1000), "white").save(big, "PNG")
    request, code, text = {
        "too many images": (dict(images=[image] * (MAX_IMAGES + 1)), grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"the limit is {MAX_IMAGES}"),
        "oversized image": (dict(images=[image, big.getvalue()]), grpc.StatusCode.RESOURCE_EXHAUSTED,
                            "image 1 is 1100x1000 pixels"),
        "top too large": (dict(images=[image], top=MAX_TOP + 1), grpc.StatusCode.INVALID_ARGUMENT,
                          f"top must be between 1 and {MAX_TOP}"),
        "bad uncertainty": (dict(images=[image], uncertainty="vibes"), grpc.StatusCode.INVALID_ARGUMENT,
                            "uncertainty must be one of margin, entropy"),
        "unknown model": (dict(images=[image], model="no-such-model"), grpc.StatusCode.NOT_FOUND, "unknown model"),
        "bad model name": (dict(images=[image], model="../digits"), grpc.StatusCode.INVALID_ARGUMENT, "name"),
        "no images": (dict(images=[]), grpc.StatusCode.INVALID_ARGUMENT, "no images"),
        "not an image": (dict(images=[image, b"not an image"]), grpc.StatusCode.INVALID_ARGUMENT,
                         "image 1 could not be decoded"),
        "deadline": (dict(images=[image] * MAX_IMAGES, timeout=0.005), grpc.StatusCode.DEADLINE_EXCEEDED, ""),
        "message too large": (dict(images=[b"x" * (17 << 20)]), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    }[case]
    timeout = request.pop("timeout", 120)
    request.setdefault("model", MODEL)
    with pytest.raises(grpc.RpcError) as caught:
        pb_grpc.InferenceStub(server.channel()).RankForLabelling(pb.RankForLabellingRequest(**request),
                                                                 metadata=bearer("web"), timeout=timeout)
    assert caught.value.code() == code, caught.value.details()
    assert text in (caught.value.details() or "")
    assert "Traceback" not in server.log() and "crashed" not in server.log()


def test_ranking_calls_at_once_are_bounded(rank_server, digits):
    """--max-ranking-calls 1: of four calls started together, the ones that find the slot taken are
    refused at once with RESOURCE_EXHAUSTED naming the setting; Classify is not held up by them."""
    import threading

    server, _ = rank_server
    images = [image for image, _ in digits["unseen"][:MAX_IMAGES]]
    barrier = threading.Barrier(4)
    codes: list[tuple[grpc.StatusCode, str]] = []

    def call() -> None:
        stub = pb_grpc.InferenceStub(server.channel())
        barrier.wait()
        try:
            stub.RankForLabelling(pb.RankForLabellingRequest(images=images, model=MODEL, top=4),
                                  metadata=bearer("web"), timeout=120)
            codes.append((grpc.StatusCode.OK, ""))
        except grpc.RpcError as err:
            codes.append((err.code(), err.details() or ""))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    refused = [details for code, details in codes if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert any(code == grpc.StatusCode.OK for code, _ in codes), codes
    assert refused and all("--max-ranking-calls" in details for details in refused), codes
    assert {code for code, _ in codes} <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_scope_classify_is_required(rank_server, digits):
    server, _ = rank_server
    images = [digits["unseen"][0][0]]
    for metadata, code in [((), grpc.StatusCode.UNAUTHENTICATED), (bearer("pipeline"), grpc.StatusCode.PERMISSION_DENIED)]:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.InferenceStub(server.channel()).RankForLabelling(
                pb.RankForLabellingRequest(images=images, model=MODEL), metadata=metadata, timeout=30)
        assert caught.value.code() == code
    with Client(server.target, token=TOKENS["pipeline"][0]) as client, pytest.raises(PermissionDeniedError):
        client.rank_for_labelling(images, model=MODEL)


def test_client_tournament_over_several_calls(rank_server, digits):
    """40 images in calls of 12: the finalists are ranked together, so the answer still holds no
    image with its re-encoded copy, and every image it was trained on is reported."""
    server, _ = rank_server
    unseen = [image for image, _ in digits["unseen"][:26]]
    images = unseen + [jpeg_copy(image) for image in unseen[:6]] + [image for image, _ in digits["train"][:8]]
    with Client(server.target, token=TOKENS["web"][0]) as client:
        result = client.rank_for_labelling(images, model=MODEL, top=5, batch_size=12)
    assert [image.rank for image in result] == [1, 2, 3, 4, 5] and result.version == 1
    chosen = {image.index for image in result}
    assert len(chosen) == 5 and all(i < 32 for i in chosen)
    assert all(not {i, i + 26} <= chosen for i in range(6))
    assert [image.index for image in result.already_labelled] == list(range(32, 40))
    assert result.training_set_known and result.training_set_size == len(digits["train"])


def test_cli_rank_prints_the_table(rank_server, digits, tmp_path):
    server, _ = rank_server
    folder = tmp_path / "unlabelled"
    (folder / "new").mkdir(parents=True)
    for i, (image, _) in enumerate(digits["unseen"][:20]):
        (folder / "new" / f"digit-{i:02d}.png").write_bytes(image)
    (folder / "old").mkdir()
    (folder / "old" / "trained.png").write_bytes(digits["train"][0][0])
    result = run_cli("rank", str(folder), "--model", MODEL, "--top", "6", "--batch-size", "8",
                     "--target", server.target, "--token", TOKENS["web"][0])
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{MODEL} v1: 6 of 21 images to label next"), result.stdout
    assert lines[1].split() == ["rank", "uncertainty", "predicted", "image"]
    rows = [line.split() for line in lines[2:8]]
    assert [row[0] for row in rows] == ["1", "2", "3", "4", "5", "6"]
    assert all(row[-1].startswith(str(folder / "new")) for row in rows)
    assert "already labelled (in the model's training set), not recommended: 1" in result.stdout
    assert str(folder / "old" / "trained.png") in result.stdout
    as_json = run_cli("rank", str(folder), "--model", f"{MODEL}:1", "--top", "3", "--json",
                      "--target", server.target, "--token", TOKENS["web"][0])
    records = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [r["rank"] for r in records] == [1, 2, 3, 0] and records[-1]["already_labelled"]
    refused = run_cli("rank", str(folder), "--model", MODEL, "--target", server.target,
                      "--token", TOKENS["pipeline"][0], check=False)
    assert refused.returncode != 0 and "classify" in refused.stderr.lower()
