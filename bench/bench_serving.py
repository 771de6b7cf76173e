#!/usr/bin/env python3
"""Serving benchmark: raw in-process ONNX Runtime vs headswap over gRPC, in one run.

    .venv/bin/python bench/bench_serving.py [--seconds 10] [--clients 1,4,16,64]

Same model (the built-in EfficientNet-Lite0, exported into a temporary registry unless
--model-dir is given), same JPEG, same machine:
1. raw: decode + preprocess + ORT in this process, one thread, at batch 1/4/8 (best is the baseline);
2. headswap Classify (one JPEG per request) with N concurrent clients: images/s, p50, p99;
3. the same through KServe V2 with `tritonclient` (FP32 [1,224,224,3] per request, as the
   guide's peer figures were taken);
4. 16 clients while the active version is swapped every second: p99 against steady p99, errors.
Prints ratios against the raw baseline. Timings, not assertions: tests never assert on speed.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from PIL import Image

from common import prepare_registry, start_server
from headswap.inference.images import Preprocessing, load_pixels
from headswap.protocol import headswap_v1_pb2 as pb
from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc
from headswap.registry.registry import Registry

MODEL = "efficientnet-lite0"


def sample_jpeg() -> bytes:
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.coffee()).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def raw_ort(model_path: Path, manifest: dict, jpeg: bytes, batch: int, seconds: float, threads: int) -> float:
    """Images/s of decode + preprocess + infer in-process: the ceiling a server can approach."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    prep = Preprocessing.from_manifest(manifest)
    name = session.get_inputs()[0].name

    def step() -> None:
        pixels = np.stack([load_pixels(jpeg, prep.height, prep.width, 10**8) for _ in range(batch)])
        session.run(["probabilities"], {name: prep.normalize(pixels)})

    for _ in range(3):
        step()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        done += batch
    return done / (time.perf_counter() - start)


def load(call, clients: int, seconds: float) -> dict:
    """Run `call` from `clients` threads for `seconds`; images/s and latency percentiles."""
    latencies: list[float] = []
    errors = [0]
    stop = time.perf_counter() + seconds
    lock = threading.Lock()

    def worker() -> None:
        local, failed = [], 0
        while time.perf_counter() < stop:
            started = time.perf_counter()
            try:
                call()
                local.append(time.perf_counter() - started)
            except Exception:
                failed += 1
        with lock:
            latencies.extend(local)
            errors[0] += failed

    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for _ in range(clients):
            pool.submit(worker)
    elapsed = time.perf_counter() - began
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0.0
    return {"rate": len(latencies) / elapsed, "p50": pick(0.50), "p99": pick(0.99), "errors": errors[0],
            "n": len(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--model-dir", type=Path, help="registry holding efficientnet-lite0 (default: export one)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="headswap-bench-"))
    model_dir = prepare_registry(work, args.model_dir)
    registry = Registry(model_dir)
    path, manifest = registry.verified_model_path(MODEL, registry.resolve(MODEL))
    jpeg = sample_jpeg()
    print(f"model {MODEL}, JPEG {len(jpeg)} bytes, {os.cpu_count()} CPUs, {args.seconds:.0f} s per point\n")

    raw = {b: raw_ort(path, manifest, jpeg, b, args.seconds, args.threads) for b in (1, 4, 8)}
    best_batch = max(raw, key=raw.get)
    baseline = raw[best_batch]
    print("raw in-process ORT (decode + preprocess + infer)")
    for b, rate in raw.items():
        print(f"  batch {b:2d}: {rate:7.1f} img/s")
    print(f"  baseline = batch {best_batch}: {baseline:.1f} img/s\n")

    # A second version to swap to: the same file under a new number.
    copy = work / "copy.onnx"
    shutil.copy(path, copy)
    registry.publish(MODEL, copy, {k: v for k, v in manifest.items() if k not in ("name", "version", "sha256")})
    registry.activate(MODEL, 1)

    proc, port = start_server(model_dir, work, "--role", "inference", "--threads", str(args.threads))
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.InferenceStub(channel)
        request = pb.ClassifyRequest(images=[jpeg], top_k=5)
        call = lambda: stub.Classify(request, timeout=30)
        for _ in range(20):
            call()
        print("headswap Classify over gRPC (1 JPEG per request)")
        print(f"  {'clients':>7} {'img/s':>8} {'x raw':>6} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}")
        steady = {}
        for clients in [int(c) for c in args.clients.split(",")]:
            r = load(call, clients, args.seconds)
            steady[clients] = r
            print(f"  {clients:7d} {r['rate']:8.1f} {r['rate'] / baseline:6.2f} {r['p50']:7.1f} {r['p99']:7.1f} "
                  f"{r['errors']:6d}")

        import tritonclient.grpc as triton

        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        prep = Preprocessing.from_manifest(manifest)
        tensor = prep.normalize(load_pixels(jpeg, prep.height, prep.width, 10**8)[None])
        infer_input = triton.InferInput("image", list(tensor.shape), "FP32")
        infer_input.set_data_from_numpy(tensor)
        kcall = lambda: client.infer(MODEL, [infer_input])
        kcall()
        r = load(kcall, 16, args.seconds)
        print(f"\nKServe V2 ModelInfer via tritonclient, FP32 [1,224,224,3], 16 clients: {r['rate']:.1f} img/s "
              f"({r['rate'] / baseline:.2f}x raw), p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, "
              f"{r['errors']} errors")

        models = pb_grpc.ModelsStub(channel)
        stop = threading.Event()
        swaps = [0]

        def swapper() -> None:
            version = 2
            while not stop.wait(1.0):
                models.ActivateModel(pb.ActivateModelRequest(name=MODEL, version=version), timeout=60)
                version = 3 - version
                swaps[0] += 1

        thread = threading.Thread(target=swapper)
        thread.start()
        r = load(call, 16, args.seconds)
        stop.set()
        thread.join()
        base = steady.get(16) or load(call, 16, args.seconds)
        print(f"\n16 clients during {swaps[0]} hot swaps: {r['rate']:.1f} img/s, p99 {r['p99']:.1f} ms "
              f"({r['p99'] / base['p99']:.2f}x steady p99 {base['p99']:.1f} ms), {r['errors']} errors")
        if 16 in steady:
            print(f"\ntarget: 16 clients >= 0.85x raw -> {steady[16]['rate'] / baseline:.2f}x; "
                  f"swap p99 <= 1.5x steady -> {r['p99'] / base['p99']:.2f}x; errors 0 -> {r['errors']}")
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
