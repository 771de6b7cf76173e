#!/usr/bin/env python3
"""Quality benchmark: what a fine-tuned model's answers are worth, on real images from packages.

    PYTHONPATH=service .venv/bin/python bench/bench_quality.py [--sections ood] [--seconds 8] [--rounds 3]

Sections (`--sections`, comma-separated):
- `ood`: out-of-distribution scores (issue 23). Two real fine-tunes through a real server:
  scikit-image's LFW faces against background crops, and scikit-learn's handwritten digits. Each
  model's held-out images are scored against images of kinds it never saw (textures, digits or
  faces, crops of the photos that ship with scikit-image). Every candidate score
  (`headswap.training.ood`: Mahalanobis++, kNN, energy) and max-softmax are fitted on the same
  training embeddings and reported in the same run: AUROC and FPR at 95% TPR, per kind and over
  all; the served default's figure comes from the server's own `ood_score`. Then the cost:
  Classify throughput at 16 clients of the model with the score in its graph against the same head
  without it, interleaved rounds, median ratio.
- `active_learning`: RankForLabelling against random picks on scikit-learn's digits, from 20 labels
  in rounds of 20: labels needed for 90% and 95% held-out accuracy, median over `--seeds`
  (bench/active_learning.py says exactly what runs where).
Timings, not assertions: tests never assert on speed.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import grpc
import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import load  # noqa: E402
from common import prepare_registry, start_server  # noqa: E402
from headswap.inference.images import Preprocessing, load_pixels  # noqa: E402
from headswap.protocol import headswap_v1_pb2 as pb  # noqa: E402
from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc  # noqa: E402
from headswap.registry.registry import Registry  # noqa: E402
from headswap.training import compose, evaluation, ood  # noqa: E402

BASE = "efficientnet-lite0"
Examples = list[tuple[bytes, str]]


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def gray_png(image: np.ndarray) -> bytes:
    return png((np.clip(image, 0, 1) * 255).astype(np.uint8))


def digit_png(image: np.ndarray) -> bytes:
    """An 8x8 digit as dark ink on white paper (as tests/test_finetune.py draws them)."""
    ink = Image.fromarray((image / 16.0 * 255).astype(np.uint8)).resize((48, 48), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    ImageOps.invert(ImageOps.expand(ink, 8, 0)).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


def crops(image: np.ndarray, count: int, size: int, rng: np.random.Generator) -> list[bytes]:
    h, w = image.shape[:2]
    return [png(np.ascontiguousarray(image[r:r + size, c:c + size]))
            for r, c in zip(rng.integers(0, h - size, count), rng.integers(0, w - size, count))]


def datasets() -> dict[str, dict[str, Examples | dict[str, list[bytes]]]]:
    """Per fine-tune: train / validation / held-out examples, and foreign images by kind."""
    from skimage import data
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(0)
    textures = [c for t in (data.brick(), data.grass(), data.gravel()) for c in crops(t, 40, 128, rng)]
    photos = [c for p in (data.coffee(), data.chelsea(), data.astronaut(), data.rocket(), data.hubble_deep_field(),
                          data.immunohistochemistry()) for c in crops(p, 20, 160, rng)]
    lfw = data.lfw_subset()
    digits = load_digits()
    digit_pngs = [(digit_png(digits.images[i]), str(digits.target[i])) for i in range(len(digits.target))]
    faces: dict[str, list] = {"train": [], "validation": [], "heldout": []}
    for offset, label in ((0, "face"), (100, "background")):
        order = rng.permutation(100)
        for rank, i in enumerate(order):
            part = "train" if rank < 56 else "validation" if rank < 70 else "heldout"
            faces[part].append((gray_png(lfw[offset + i]), label))
    order = rng.permutation(len(digit_pngs))
    digit_sets = {"train": [digit_pngs[i] for i in order[:400]], "validation": [digit_pngs[i] for i in order[400:500]],
                  "heldout": [digit_pngs[i] for i in order[500:800]]}
    faces_pngs = [image for image, _ in faces["heldout"]]
    return {
        "faces": {**faces, "foreign": {"textures": textures, "digits": [d for d, _ in digit_pngs[1000:1200]],
                                       "photos": photos}},
        "digits": {**digit_sets, "foreign": {"textures": textures, "faces": faces_pngs, "photos": photos}},
    }


def finetune(channel: grpc.Channel, name: str, sets: dict, epochs: int) -> int:
    """One FineTune with an explicit validation split; returns the stored version."""
    stub = pb_grpc.TrainingStub(channel)

    def requests():
        yield pb.FineTuneRequest(config=pb.FineTuneConfig(name=name, epochs=epochs, activate=True, seed=1))
        for part in ("train", "validation"):
            examples = sets[part]
            for start in range(0, len(examples), 128):
                yield pb.FineTuneRequest(batch=pb.ExampleBatch(examples=[
                    pb.Example(image=image, label=label, validation=part == "validation")
                    for image, label in examples[start:start + 128]]))

    job = stub.FineTune(requests(), timeout=300)
    last = list(stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=900))[-1]
    if last.state != pb.JOB_STATE_SUCCEEDED:
        raise SystemExit(f"fine-tune {name} failed: {last.message}")
    return int(last.version)


def embedder(path: Path, manifest: dict) -> Callable[[list[bytes]], np.ndarray]:
    """The base version's embedding, in this process: what the trainer fitted the scores on."""
    pre = Preprocessing.from_manifest(manifest)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def embed(images: list[bytes]) -> np.ndarray:
        out = []
        for start in range(0, len(images), 32):
            batch = np.stack([load_pixels(image, pre.height, pre.width, 10**8) for image in images[start:start + 32]])
            out.append(session.run(["embedding"], {"image": pre.normalize(batch)})[0])
        return np.concatenate(out)

    return embed


def head_layers(path: Path) -> list[compose.DenseWeights]:
    """The Dense layers of a composed version, read back from its initializers."""
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
               if t.name.startswith(compose.PREFIX)}
    count = len(weights) // 2
    return [compose.DenseWeights(weights[f"{compose.PREFIX}/dense{i}/kernel"], weights[f"{compose.PREFIX}/dense{i}/bias"],
                                 "softmax" if i == count - 1 else "relu") for i in range(count)]


def served_scores(channel: grpc.Channel, model: str, images: list[bytes]) -> np.ndarray:
    stub = pb_grpc.InferenceStub(channel)
    scores = []
    for start in range(0, len(images), 64):
        response = stub.Classify(pb.ClassifyRequest(images=images[start:start + 64], model=model, top_k=1), timeout=300)
        scores += [r.ood_score for r in response.results]
    return np.array(scores)


def ood_quality(channel: grpc.Channel, registry: Registry, name: str, sets: dict, epochs: int) -> None:
    version = finetune(channel, name, sets, epochs)
    path, manifest = registry.verified_model_path(name, version)
    base_path, base_manifest = registry.verified_model_path(BASE, 1)
    embed = embedder(base_path, base_manifest)
    labels = manifest["labels"]
    x_train = embed([image for image, _ in sets["train"]])
    y_train = np.array([labels.index(label) for _, label in sets["train"]])
    heldout = [image for image, _ in sets["heldout"]]
    x_in = embed(heldout)
    foreign = {kind: embed(images) for kind, images in sets["foreign"].items()}
    layers = head_layers(path)
    accuracy = float(np.mean(evaluation.head_logits(layers, x_in).argmax(axis=1)
                             == np.array([labels.index(label) for _, label in sets["heldout"]])))
    print(f"\n{name}: {len(x_train)} training images, {len(labels)} classes, held-out accuracy {accuracy:.3f}; "
          f"{len(x_in)} held-out vs " + ", ".join(f"{len(v)} {k}" for k, v in foreign.items()))
    kinds = list(foreign)
    print(f"  {'method':<16} {'AUROC all':>9} {'FPR95 all':>9}  " + "  ".join(f"{'AUROC ' + k:>14}" for k in kinds))
    figures = {}
    for method in ood.METHODS:
        fitted = ood.fit(method, x_train, y_train, len(labels))
        inside = fitted.score(x_in, evaluation.head_logits(layers, x_in))
        outside = {k: fitted.score(v, evaluation.head_logits(layers, v)) for k, v in foreign.items()}
        everything = np.concatenate(list(outside.values()))
        figures[method] = ood.auroc(inside, everything)
        print(f"  {method:<16} {figures[method]:>9.3f} {ood.fpr_at_95_tpr(inside, everything):>9.3f}  "
              + "  ".join(f"{ood.auroc(inside, outside[k]):>14.3f}" for k in kinds))
    default = manifest["ood"]["method"]
    inside = served_scores(channel, name, heldout)
    everything = np.concatenate([served_scores(channel, name, images) for images in sets["foreign"].values()])
    served = ood.auroc(inside, everything)
    print(f"  served default ({default}, the server's ood_score): AUROC {served:.3f}, FPR95 "
          f"{ood.fpr_at_95_tpr(inside, everything):.3f}; threshold {manifest['ood']['threshold']:.4g} accepts "
          f"{np.mean(inside <= manifest['ood']['threshold']):.3f} of held-out images")
    print(f"  default - max_softmax: {served - figures[ood.MAX_SOFTMAX]:+.3f} AUROC (target >= +0.05)")


def publish_without_score(registry: Registry, name: str, version: int, plain_name: str) -> int:
    """The same head composed without the score (the graph of a version published before issue 23)."""
    path, manifest = registry.verified_model_path(name, version)
    base_path, _ = registry.verified_model_path(BASE, 1)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.onnx"
        compose.compose(base_path, head_layers(path), out)
        plain = {k: v for k, v in manifest.items() if k not in ("ood", "sha256", "created", "version", "name")}
        plain["outputs"] = {k: v for k, v in manifest["outputs"].items() if k != "ood_score"}
        return registry.publish(plain_name, out, plain, activate=True)


def raw_cost(registry: Registry, name: str, plain: int, runs: int = 40) -> None:
    """The graph alone (in this process, 1 thread, batch 8): composed with and without the score,
    each run for the outputs a server reads (probabilities, and ood_score when there is one); runs
    alternate, and the fastest of each is kept (the least disturbed by other work on the machine)."""
    paths = {"with ood_score": registry.verified_model_path(name, registry.active_version(name))[0],
             "without": registry.verified_model_path(f"{name}-plain", plain)[0]}
    batch = np.random.default_rng(0).uniform(-1, 1, (8, 224, 224, 3)).astype(np.float32)
    steps = {}
    for label, path in paths.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        outputs = [o.name for o in session.get_outputs() if o.name != "embedding"]
        steps[label] = lambda s=session, o=outputs: s.run(o, {"image": batch})
        steps[label]()
    best = {label: float("inf") for label in steps}
    for run in range(runs):
        for label, step in (steps.items() if run % 2 else reversed(list(steps.items()))):
            started = time.perf_counter()
            step()
            best[label] = min(best[label], time.perf_counter() - started)
    with_ood, without = (8 / best[label] for label in steps)
    print(f"  raw ONNX Runtime, 1 thread, batch 8, fastest of {runs}: with ood_score {with_ood:.1f} img/s, without "
          f"{without:.1f} img/s: {with_ood / without:.3f}x; files {paths['with ood_score'].stat().st_size / 1e6:.1f} "
          f"MB and {paths['without'].stat().st_size / 1e6:.1f} MB")


def ood_cost(channel: grpc.Channel, registry: Registry, name: str, image: bytes, clients: int, seconds: float,
             rounds: int) -> None:
    plain = publish_without_score(registry, name, registry.active_version(name), f"{name}-plain")
    raw_cost(registry, name, plain)
    stub = pb_grpc.InferenceStub(channel)
    calls = {label: (lambda m=model: stub.Classify(pb.ClassifyRequest(images=[image], model=m, top_k=1), timeout=60))
             for label, model in (("with ood_score", name), ("without", f"{name}-plain"))}
    for call in calls.values():
        for _ in range(20):
            call()  # load and warm both
    rates: dict[str, list[float]] = {label: [] for label in calls}
    for round_ in range(rounds):
        for label, call in (calls.items() if round_ % 2 == 0 else reversed(list(calls.items()))):
            result = load(call, clients, seconds)
            rates[label].append(result["rate"])
            print(f"  round {round_ + 1} {label:<15} {result['rate']:7.1f} img/s  p50 {result['p50']:.1f} ms  "
                  f"p99 {result['p99']:.1f} ms  errors {result['errors']}")
    with_ood, without = (statistics.median(rates[label]) for label in calls)
    print(f"  Classify at {clients} clients, median of {rounds} rounds: with ood_score {with_ood:.1f} img/s, without "
          f"{without:.1f} img/s: {with_ood / without:.3f}x (target >= 0.97x)")


def bench_ood(args: argparse.Namespace, work: Path) -> None:
    model_dir = prepare_registry(work, args.model_dir)
    proc, port = start_server(model_dir, work / "server")
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        registry = Registry(model_dir)
        sets = datasets()
        print("== ood: AUROC / FPR at 95% TPR (out-of-distribution = positive; higher score = more foreign)")
        ood_quality(channel, registry, "faces", sets["faces"], epochs=20)
        ood_quality(channel, registry, "digits", sets["digits"], epochs=30)
        print(f"\n== ood: cost (faces model, one {len(sets['faces']['heldout'][0][0])}-byte PNG per request)")
        ood_cost(channel, registry, "faces", sets["faces"]["heldout"][0][0], args.clients, args.seconds, args.rounds)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def bench_active_learning(args: argparse.Namespace, work: Path) -> None:
    import json

    from active_learning import active_learning, print_report

    result = active_learning(args)
    print_report(result, args.seeds)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


SECTIONS: dict[str, Callable[[argparse.Namespace, Path], None]] = {"ood": bench_ood,
                                                                   "active_learning": bench_active_learning}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="ood", help=f"comma-separated: {', '.join(SECTIONS)}")
    parser.add_argument("--model-dir", type=Path, help="registry holding efficientnet-lite0 (default: export one)")
    parser.add_argument("--seconds", type=float, default=8.0, help="per throughput measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the cost measurement")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=5, help="active_learning: seeds (median reported)")
    parser.add_argument("--pool-size", type=int, default=0, help="active_learning: pool images (0 = all)")
    parser.add_argument("--max-labels", type=int, default=1000, help="active_learning: stop an arm here")
    parser.add_argument("--json", type=Path, help="active_learning: also write its result here")
    args = parser.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    for section in sections:
        if section not in SECTIONS:
            parser.error(f"section {section!r} is not implemented here; implemented: {', '.join(SECTIONS)}")
    for section in sections:
        with tempfile.TemporaryDirectory(prefix=f"bench-quality-{section}-") as tmp:
            SECTIONS[section](args, Path(tmp))


if __name__ == "__main__":
    main()
