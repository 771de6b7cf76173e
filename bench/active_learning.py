#!/usr/bin/env python3
"""Active learning on scikit-learn's digits: RankForLabelling's picks against random picks (issue 23).
The `active_learning` section of bench/bench_quality.py (run it there, or on its own here):

    .venv/bin/python bench/bench_quality.py --sections active_learning [--seeds 5] [--pool-size 0]
                                             [--max-labels 1000] [--model-dir REGISTRY] [--json FILE]

Data: the 1,797 digits rendered as 64x64 ink-on-paper PNGs (as the tests do), split per seed
into a held-out 30% (stratified) and a pool (the rest, or `--pool-size` of it). Both arms start
from the same 20 random pool images, labelled, and grow in rounds of 20 until held-out accuracy
reaches 95% or `--max-labels`:

- ranked: each round, the head trained on the labels so far is published as a new version of a
  model in the registry of a real `headswap serve` subprocess (base ONNX graph + head, composed by
  the trainer's own `compose.py`, with the labelled images' sha256 as its training set), and the
  whole pool goes to RankForLabelling (one call to a `--role inference` server; it marks the
  labelled images itself and uses them as covered ground); the top 20 are labelled next.
- random: 20 unlabelled pool images drawn at random.

What is done in-process, and why: the head of each round is trained here with the trainer's own
code (`trainer.build_head` + `trainer.fit`, its defaults, labels repeated for >= ~300 steps) on
embeddings of the base computed once here with ONNX Runtime, and held-out accuracy is that head's
on the held-out embeddings. A FineTune through the server per round would re-upload the labels,
hold out a validation split from 20 labels, and refuse a round whose labels miss a class; on 2
cores the server's ranking of the pool (a backbone pass over ~1,250 images) already dominates a
round. Ranking is always the real server's.

Prints, per arm, the labels needed to reach 90% and 95% held-out accuracy (median over seeds;
None when not reached within --max-labels) and the ratio ranked / random (target <= 0.6).
`active_learning(args)` returns the same as a dict (for bench_quality.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The trainer's default for head-only jobs (`--trainer-backend auto`): JAX, where it is installed.
os.environ.setdefault("KERAS_BACKEND", "jax")

THRESHOLDS = (0.90, 0.95)
ROUND = 20
MODEL = "al-digits"
BASE = "efficientnet-lite0"


def embed(model_path: Path, manifest: dict[str, Any], images: list[bytes]) -> np.ndarray:
    """The base's embeddings, decoded and preprocessed as the server does."""
    import onnxruntime as ort

    from headswap.inference.images import Preprocessing, load_pixels

    pre = Preprocessing.from_manifest(manifest)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    out = []
    for start in range(0, len(images), 64):
        pixels = np.stack([load_pixels(data, pre.height, pre.width, 40_000_000, i)
                           for i, data in enumerate(images[start:start + 64])])
        out.append(session.run([manifest["outputs"]["embedding"]], {session.get_inputs()[0].name:
                                                                      pre.normalize(pixels)})[0])
    return np.concatenate(out).reshape(len(images), -1)


def train_head(x: np.ndarray, y: np.ndarray, classes: int, seed: int) -> Any:
    """The trainer's head and fit (its defaults: Adam 5e-3, batch 32, 10 epochs), on these labels
    repeated so that 10 epochs make at least ~300 steps: 20 labels alone would make 10 steps."""
    from headswap.training import trainer
    from headswap.training.spec import FineTuneSpec

    spec = FineTuneSpec(name=MODEL, seed=seed)
    trainer.set_random_seed(seed)
    repeats = max(1, math.ceil(300 * spec.batch_size / (spec.epochs * len(y))))
    head = trainer.build_head(x.shape[1], classes, spec.dropout, spec.hidden_units)
    trainer.fit(head, np.tile(x, (repeats, 1)), np.tile(y, repeats), x[:1], y[:1], spec, spec.learning_rate,
                spec.epochs, "training_head", lambda phase, **fields: None, [str(c) for c in range(classes)])
    return head


def publish(registry: Any, base_path: Path, base_manifest: dict[str, Any], head: Any, labelled: list[bytes],
            work: Path) -> int:
    """The head appended to the base's graph (trainer's compose.py), with its training set; active."""
    from headswap.registry import training_set
    from headswap.training import compose

    out = work / "model.onnx"
    shape = compose.compose(base_path, compose.dense_layers_of(head), out)
    digests = work / training_set.TRAINING_SET_FILE
    count = training_set.write(digests, training_set.digests_of(labelled))
    manifest = {"kind": "fine-tune", "source": base_manifest.get("source"), "labels": [str(c) for c in range(10)],
                "preprocessing": base_manifest["preprocessing"], "input": base_manifest["input"],
                "outputs": {"probabilities": compose.PROBABILITIES, "embedding": compose.EMBEDDING,
                            "embedding_size": shape["embedding_size"]},
                "training_set": {"file": training_set.TRAINING_SET_FILE, "images": count},
                "base_model": {"name": BASE, "version": 1}}
    return registry.publish(MODEL, out, manifest, activate=True, extra_files={training_set.TRAINING_SET_FILE: digests})


def labels_needed(curve: list[tuple[int, float]], threshold: float) -> int | None:
    return next((n for n, accuracy in curve if accuracy >= threshold), None)


def median(values: list[int | None]) -> float | None:
    """Median over seeds, a seed that never got there counting as infinitely many labels."""
    finite = [math.inf if v is None else v for v in values]
    value = float(np.median(finite))
    return None if math.isinf(value) else value


def run_arm(arm: str, seed: int, pool: np.ndarray, test: np.ndarray, start: np.ndarray, emb: np.ndarray,
            y: np.ndarray, images: list[bytes], args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    from headswap.protocol import headswap_v1_pb2 as pb

    rng = np.random.default_rng(seed + 1000)
    labelled = list(start)
    curve: list[tuple[int, float]] = []
    rank_seconds: list[float] = []
    while True:
        round_started = time.monotonic()
        head = train_head(emb[labelled], y[labelled], 10, seed)
        accuracy = float(np.mean(np.argmax(head.predict(emb[test], batch_size=512, verbose=0), axis=1) == y[test]))
        curve.append((len(labelled), round(accuracy, 4)))
        print(f"  seed {seed} {arm:>6}: {len(labelled):4d} labels, held-out accuracy {accuracy:.4f} "
              f"(head {time.monotonic() - round_started:.1f} s"
              f"{f', last ranking {rank_seconds[-1]:.1f} s' if rank_seconds else ''})", flush=True)
        if accuracy >= THRESHOLDS[-1] or len(labelled) >= args.max_labels:
            break
        taken = set(labelled)
        unlabelled = np.array([i for i in pool if i not in taken])
        if len(unlabelled) == 0:
            break
        if arm == "random":
            picks = rng.choice(unlabelled, size=min(ROUND, len(unlabelled)), replace=False).tolist()
        else:
            version = publish(ctx["registry"], ctx["base_path"], ctx["base_manifest"], head,
                              [images[i] for i in labelled], ctx["work"])
            started = time.monotonic()
            response = ctx["stub"].RankForLabelling(pb.RankForLabellingRequest(
                images=[images[i] for i in pool], model=MODEL, version=version, top=ROUND), timeout=600)
            rank_seconds.append(time.monotonic() - started)
            marked = {pool[r.index] for r in response.images if r.already_labelled}
            assert marked == taken, "the server did not mark exactly the labelled images"
            picks = [int(pool[r.index]) for r in response.images if r.rank > 0]
        labelled.extend(picks)
    return {"curve": curve, "labels_to": {f"{t:.2f}": labels_needed(curve, t) for t in THRESHOLDS},
            "rank_seconds_median": round(float(np.median(rank_seconds)), 2) if rank_seconds else None}


def active_learning(args: argparse.Namespace) -> dict[str, Any]:
    """The whole comparison (see the module docstring); returns figures and what was done."""
    import grpc
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from bench_finetune import digit_png  # the digits as the fine-tune bench and tests draw them
    from common import prepare_registry, start_server
    from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc
    from headswap.registry.registry import Registry

    started = time.monotonic()
    data = load_digits()
    y = data.target.astype(np.int64)
    images = [digit_png(image) for image in data.images]
    with tempfile.TemporaryDirectory(prefix="headswap-bench-al-") as tmp:
        work = Path(tmp)
        model_dir = prepare_registry(work, args.model_dir)
        registry = Registry(model_dir, keep_versions=2)
        base_path, base_manifest = registry.verified_model_path(BASE, 1)
        emb = embed(base_path, base_manifest, images)
        proc, port = start_server(model_dir, work / "server", "--max-images-per-request", "2048",
                                  "--max-message-bytes", str(64 << 20), "--max-request-bytes-in-flight",
                                  str(256 << 20), "--threads", "2", "--role", "inference")
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)])
        ctx = {"registry": registry, "base_path": base_path, "base_manifest": base_manifest, "work": work,
               "stub": pb_grpc.InferenceStub(channel)}
        per_seed = []
        try:
            for seed in range(args.seeds):
                pool, test = train_test_split(np.arange(len(y)), test_size=0.3, stratify=y, random_state=seed)
                if args.pool_size:
                    pool = np.random.default_rng(seed).choice(pool, size=min(args.pool_size, len(pool)), replace=False)
                start = np.random.default_rng(seed).choice(pool, size=ROUND, replace=False)
                per_seed.append({"seed": seed, "pool": int(len(pool)), "test": int(len(test)),
                                 **{arm: run_arm(arm, seed, pool, test, start, emb, y, images, args, ctx)
                                    for arm in ("ranked", "random")}})
        finally:
            channel.close()
            proc.terminate()
            proc.wait(60)
    result: dict[str, Any] = {
        "what_was_done": ("ranking: RankForLabelling on a real headswap server, margin uncertainty x typicality "
                          "x k-center greedy, the whole pool in one call, labelled images marked by the server from the "
                          "version's training set; heads: trained in this process with the trainer's own "
                          "build_head/fit on base embeddings and published as composed versions (no FineTune "
                          "upload per round); accuracy: that head on the held-out split"),
        "seeds": args.seeds, "start": ROUND, "round": ROUND, "max_labels": args.max_labels,
        "pool_size": args.pool_size or "all (70% of 1,797)", "per_seed": per_seed,
        "seconds": round(time.monotonic() - started, 1),
    }
    for threshold in THRESHOLDS:
        key = f"{threshold:.2f}"
        ranked = median([s["ranked"]["labels_to"][key] for s in per_seed])
        random = median([s["random"]["labels_to"][key] for s in per_seed])
        result[f"labels_to_{key}"] = {"ranked": ranked, "random": random,
                                      "ratio": round(ranked / random, 3) if ranked and random else None}
    result["target"] = "ratio <= 0.6"
    return result


def print_report(result: dict[str, Any], seeds: int) -> None:
    print(f"\nactive learning, digits, {seeds} seed(s), rounds of {ROUND} from {ROUND} labels "
          f"({result['seconds']} s); {result['what_was_done']}")
    print(f"{'held-out accuracy':<18} {'ranked':>8} {'random':>8} {'ratio':>6}  (median labels needed; target <= 0.6)")
    for threshold in THRESHOLDS:
        row = result[f"labels_to_{threshold:.2f}"]
        print(f"{threshold:<18.0%} {row['ranked'] or '-':>8} {row['random'] or '-':>8} {row['ratio'] or '-':>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="seeds (median reported); 1 for a quick run")
    parser.add_argument("--pool-size", type=int, default=0, help="use this many pool images (0 = all)")
    parser.add_argument("--max-labels", type=int, default=1000, help="stop an arm here if 95%% is not reached")
    parser.add_argument("--model-dir", type=Path, help="registry holding efficientnet-lite0 (default: export one)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    result = active_learning(args)
    print_report(result, args.seeds)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
