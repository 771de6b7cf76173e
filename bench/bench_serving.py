#!/usr/bin/env python3
"""Serving benchmark: raw in-process ONNX Runtime vs headswap over gRPC, in one run.

    .venv/bin/python bench/bench_serving.py [--seconds 10] [--clients 1,4,16,64]

Same model (the built-in EfficientNet-Lite0, exported into a temporary registry unless
--model-dir is given), same JPEG, same machine:
1. raw: decode + preprocess + ORT in this process, one thread, at batch 1/4/8 (best is the baseline);
2. headswap Classify (one JPEG per request) with N concurrent clients: images/s, p50, p99;
3. the same through KServe V2 with `tritonclient` (FP32 [1,224,224,3] per request, as the
   guide's peer figures were taken);
4. 16 clients while the active version is swapped every second: p99 against steady p99, errors;
5. with --precision bf16,int8: the fast tiers (headswap.export.precision) built from the same fp32
   file, their accuracy against fp32 on the held-out photos, raw inference (ORT fp32 vs the tier's
   OpenVINO), Classify (JPEG) and KServe (FP32 tensor) throughput per tier, fp32 and tiers in
   interleaved rounds on one server;
   ratios against the fp32 tier of the same run (--only-precision skips sections 1-4);
6. with --lanes (alone with --only-lanes): inference lanes (`--inference-lanes`): raw ORT, one session
   on every thread against one 1-thread session per thread run side by side, then KServe V2 FP32
   throughput of a server with one lane against one with a lane per thread, interleaved rounds;
7. with --floor (alone with --only-floor): headswap against bench/floor_server.py, the least a Python
   KServe V2 server can do (frombuffer + one spinning ORT session), and its --echo mode (transport
   alone), interleaved rounds; shows how much of each request is headswap's own work.
8. with --protocol http (alone): the Open Inference Protocol over REST (tritonclient.http, Triton's
   binary data, one [1,224,224,3] image per request, each client thread with its own client) against
   the same load over gRPC (tritonclient.grpc), interleaved rounds on one server; REST/gRPC ratio and
   server CPU per request. --http-target/--grpc-target measure another server instead (a peer's REST
   and gRPC ports, model efficientnet-lite0, input image, output probabilities), so a peer started
   on the same ONNX file gets the same load.
Prints ratios against the raw baseline. Timings, not assertions: tests never assert on speed.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import grpc
import numpy as np
import onnxruntime as ort
from PIL import Image

from common import cpu_seconds, http_port, prepare_registry, start_server
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


def images_per_second(step, batch: int, seconds: float) -> float:
    """Run `step` (one batch of `batch` images) for `seconds` after 3 warm-up calls."""
    for _ in range(3):
        step()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        done += batch
    return done / (time.perf_counter() - start)


def ort_session(path: Path, threads: int, spin: bool = True) -> ort.InferenceSession:
    """An in-process ORT session on `threads` intra-op threads (ORT's default spinning unless `spin` is False)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def fp32_input(manifest: dict, jpeg: bytes):
    """The JPEG as the model's FP32 [1,H,W,3] input tensor, and as a tritonclient InferInput."""
    import tritonclient.grpc as triton

    prep = Preprocessing.from_manifest(manifest)
    tensor = prep.normalize(load_pixels(jpeg, prep.height, prep.width, 10**8)[None])
    infer_input = triton.InferInput("image", list(tensor.shape), "FP32")
    infer_input.set_data_from_numpy(tensor)
    return tensor, infer_input


def heldout_inputs(manifest: dict):
    """An endless, thread-safe cycle of tritonclient InferInputs: the held-out photos' crops as FP32."""
    import itertools

    import tritonclient.grpc as triton
    from headswap.export.calibration_images import photo_sets

    prep = Preprocessing.from_manifest(manifest)
    _, heldout = photo_sets(prep.height, prep.width)
    inputs = []
    for crop in prep.normalize(heldout.pixels):
        infer_input = triton.InferInput("image", [1, *crop.shape], "FP32")
        infer_input.set_data_from_numpy(crop[None])
        inputs.append(infer_input)
    return itertools.cycle(inputs)  # next() on a cycle holds the GIL: safe across the load's threads


def raw_ort(model_path: Path, manifest: dict, jpeg: bytes, batch: int, seconds: float, threads: int) -> float:
    """Images/s of decode + preprocess + infer in-process: the ceiling a server can approach."""
    session = ort_session(model_path, threads)
    prep = Preprocessing.from_manifest(manifest)
    name = session.get_inputs()[0].name

    def step() -> None:
        pixels = np.stack([load_pixels(jpeg, prep.height, prep.width, 10**8) for _ in range(batch)])
        session.run(["probabilities"], {name: prep.normalize(pixels)})

    return images_per_second(step, batch, seconds)


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


def build_tiers(registry: Registry, path: Path, manifest: dict, tiers: list[str], work: Path) -> dict[str, int]:
    """Publish each tier of the fp32 version (not activated); its gate is measured and printed, not
    enforced (min_agreement 0), so that the speed of a tier that misses it is still shown."""
    from headswap.export import precision

    versions: dict[str, int] = {}
    for tier in tiers:
        scratch = work / f"tier-{tier}"
        scratch.mkdir()
        shutil.copy(path, scratch / "model.onnx")
        started = time.perf_counter()
        built = precision.zero_shot_tier(scratch / "model.onnx", tier, manifest, precision.Gate(min_agreement=0.0))
        tier_path, fields = built.path, built.fields
        base = {k: v for k, v in manifest.items() if k not in ("name", "version", "sha256")}
        versions[tier] = registry.publish(MODEL, tier_path, {**base, **fields}, extra_files=built.extra_files)
        verdict = precision.gate_failure(tier, fields, precision.Gate(), fine_tune=False)
        a, recheck = fields["accuracy"], fields.get("recheck")
        rechecked = (f" (alone {100 * a['tier_alone']['top1_agreement']:.1f}%; {100 * recheck['heldout_share']:.1f}% "
                     f"re-checked in fp32, margin {recheck['margin']:.4f})") if recheck else ""
        print(f"  {tier}: built in {time.perf_counter() - started:.0f} s, {tier_path.stat().st_size >> 20} MiB; top-1 "
              f"agreement with fp32 {100 * a['top1_agreement']:.1f}% of {a['heldout_images']} held-out photos"
              f"{rechecked} -> default gate {'PASSES' if not verdict else 'REFUSES'}")
    return versions


def raw_tier(tier_path: Path, tier: str, batch: int, seconds: float, threads: int) -> float:
    """Images/s of inference alone (no decode) in-process: ORT for fp32, OpenVINO for a tier."""
    from headswap.export import precision
    from headswap.inference.openvino_runtime import compile_model

    images = np.random.default_rng(0).uniform(-1, 1, (batch, 224, 224, 3)).astype(np.float32)
    if tier == "fp32":
        session = ort_session(tier_path, threads)
        step = lambda: session.run(["probabilities"], {"image": images})
    else:
        compiled = compile_model(tier_path, tier, threads)
        step = lambda: precision.openvino_probabilities(compiled, images)
    return images_per_second(step, batch, seconds)


def raw_lanes(path: Path, threads: int, batch: int, seconds: float) -> tuple[float, float]:
    """Images/s in-process: one ORT session on `threads` threads, then `threads` 1-thread sessions
    each run from its own Python thread (ORT releases the GIL), inference only."""
    images = np.random.default_rng(0).uniform(-1, 1, (batch, 224, 224, 3)).astype(np.float32)
    whole = ort_session(path, threads, spin=False)
    one = images_per_second(lambda: whole.run(["probabilities"], {"image": images}), batch, seconds)
    lanes = [ort_session(path, 1, spin=False) for _ in range(threads)]
    rates: list[float] = []
    workers = [threading.Thread(target=lambda s=s: rates.append(
        images_per_second(lambda: s.run(["probabilities"], {"image": images}), batch, seconds))) for s in lanes]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return one, sum(rates)


def kserve_rounds(starts: dict[str, Callable[[], tuple[subprocess.Popen, int]]], infer_input, clients: list[int],
                  seconds: float, rounds: int) -> dict[tuple[str, int], list[dict]]:
    """KServe V2 ModelInfer load on each server in turn (one at a time, order rotated each round):
    per (label, clients), one `load` result per round, with the server's CPU ms per request."""
    import tritonclient.grpc as triton

    results: dict[tuple[str, int], list[dict]] = {}
    for round_ in range(rounds):
        order = list(starts)[round_ % len(starts):] + list(starts)[:round_ % len(starts)]
        for label in order:
            proc, port = starts[label]()
            try:
                client = triton.InferenceServerClient(f"127.0.0.1:{port}")
                call = lambda: client.infer(MODEL, [infer_input])
                for _ in range(20):
                    call()
                for n in clients:
                    cpu = cpu_seconds(proc.pid)
                    result = load(call, n, seconds)
                    result["cpu_ms"] = (cpu_seconds(proc.pid) - cpu) * 1000 / max(result["n"], 1)
                    results.setdefault((label, n), []).append(result)
                client.close()
            finally:
                proc.terminate()
                proc.wait(60)
    return results


def bench_lanes(model_dir: Path, path: Path, manifest: dict, jpeg: bytes, clients: list[int], seconds: float,
                threads: int, rounds: int, work: Path) -> None:
    print(f"inference lanes: one session on {threads} threads against {threads} 1-thread sessions side by side")
    for batch in (1, 4, 8):
        one, lanes = raw_lanes(path, threads, batch, seconds / 2)
        print(f"  raw batch {batch}: 1 session {one:6.1f} img/s, {threads} lanes {lanes:6.1f} img/s ({lanes / one:.2f}x)")
    _, infer_input = fp32_input(manifest, jpeg)
    settings = {"1 lane": "1", f"{threads} lanes": str(threads)}
    results = kserve_rounds({label: lambda lanes=lanes: start_server(
        model_dir, work, "--role", "inference", "--threads", str(threads), "--inference-lanes", lanes)
        for label, lanes in settings.items()}, infer_input, clients, seconds, rounds)
    median = lambda runs, key: float(np.median([r[key] for r in runs]))
    print(f"\nKServe V2 ModelInfer, FP32 [1,224,224,3] per request (median of {rounds} rounds x {seconds:.0f} s)")
    print(f"  {'clients':>7} " + " ".join(f"{label + ' img/s':>14} {'p99 ms':>7}" for label in settings) + "  ratio")
    for n in clients:
        rates = [median(results[(label, n)], "rate") for label in settings]
        print(f"  {n:7d} " + " ".join(f"{median(results[(label, n)], 'rate'):14.1f} "
                                     f"{median(results[(label, n)], 'p99'):7.1f}" for label in settings)
              + f"  {rates[1] / rates[0]:.2f}x")


def start_floor(path: Path, threads: int, echo: bool) -> tuple[subprocess.Popen, int]:
    """bench/floor_server.py on a free port; returns once it listens."""
    command = [sys.executable, str(Path(__file__).with_name("floor_server.py")), str(path), "--threads", str(threads)]
    proc = subprocess.Popen(command + (["--echo"] if echo else []), stdout=subprocess.PIPE, text=True)
    match = re.search(r"listening on port (\d+)", proc.stdout.readline() if proc.stdout else "")
    if not match:
        proc.kill()
        raise SystemExit("floor_server.py did not start")
    return proc, int(match.group(1))


def bench_floor(model_dir: Path, path: Path, manifest: dict, jpeg: bytes, clients: list[int], seconds: float,
                threads: int, rounds: int, work: Path) -> None:
    tensor, infer_input = fp32_input(manifest, jpeg)
    session = ort_session(path, threads)
    compute = images_per_second(lambda: session.run(["probabilities"], {"image": tensor}), 1, seconds / 2)
    batch = np.repeat(tensor, 8, axis=0)
    raw8 = images_per_second(lambda: session.run(["probabilities"], {"image": batch}), 8, seconds / 2)
    del session
    starts = {"echo (transport only)": lambda: start_floor(path, threads, echo=True),
              "floor (frombuffer + ORT)": lambda: start_floor(path, threads, echo=False),
              "headswap": lambda: start_server(model_dir, work, "--role", "inference", "--threads", str(threads))}
    results = kserve_rounds(starts, infer_input, clients, seconds, rounds)
    median = lambda label, n, key: float(np.median([r[key] for r in results[(label, n)]]))
    print(f"floor: KServe V2 ModelInfer, FP32 [1,224,224,3] per request, {threads} threads "
          f"(median of {rounds} rounds x {seconds:.0f} s)")
    print(f"  in-process ORT with spinning: batch 1 {compute:.1f} img/s ({1000 / compute:.2f} ms), "
          f"batch 8 {raw8:.1f} img/s ({threads * 1000 / raw8:.2f} CPU ms per image)")
    print(f"  {'clients':>7} " + " ".join(f"{label:>24}" for label in starts) + "  headswap/floor")
    for n in clients:
        rates = {label: median(label, n, "rate") for label in starts}
        print(f"  {n:7d} " + " ".join(f"{rates[label]:18.1f} img/s" for label in starts)
              + f"  {rates['headswap'] / rates['floor (frombuffer + ORT)']:.2f}x")
        print(f"  {'':7} " + " ".join(f"{median(label, n, 'cpu_ms'):13.2f} CPU ms/req" for label in starts)
              + f"  x raw batch 8: {rates['headswap'] / raw8:.2f}")
    if 1 in clients:
        echo_ms = median("echo (transport only)", 1, "p50")
        ideal = 1000 / (1000 / compute + echo_ms)
        print(f"  1 client, compute + transport with nothing in between: {ideal:.1f} img/s "
              f"({1000 / compute:.2f} ms ORT + {echo_ms:.2f} ms echo p50)")


def bench_precision(model_dir: Path, registry: Registry, path: Path, manifest: dict, jpeg: bytes, tiers: list[str], clients: list[int],
                    seconds: float, threads: int, rounds: int, work: Path) -> None:
    print("precision tiers (accuracy gate: >= 99% top-1 agreement with fp32 on held-out photos)")
    # The baseline is the newest fp32 version, whichever version is active.
    fp32 = max(v for v in registry.versions(MODEL) if registry.manifest(MODEL, v).get("precision", "fp32") == "fp32")
    path, manifest = registry.verified_model_path(MODEL, fp32)
    versions = {"fp32": fp32, **build_tiers(registry, path, manifest, tiers, work)}
    print("\nraw in-process inference, no decode (fp32: ONNX Runtime; tiers: OpenVINO)")
    for batch in (1, 8):
        rates = {}
        for tier, version in versions.items():
            tier_file = registry.verified_model_path(MODEL, version)[0]
            rates[tier] = raw_tier(tier_file, tier, batch, seconds / 2, threads)
        print(f"  batch {batch}: " + ", ".join(f"{t} {r:6.1f} img/s ({r / rates['fp32']:.2f}x)" for t, r in rates.items()))
    proc, port = start_server(model_dir, work, "--role", "inference", "--threads", str(threads))
    try:
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        calls = {tier: (lambda v=version: stub.Classify(pb.ClassifyRequest(images=[jpeg], top_k=5, model=MODEL,
                                                                           version=v), timeout=30))
                 for tier, version in versions.items()}
        for call in calls.values():
            for _ in range(10):
                call()
        results: dict[tuple[str, int], list[dict]] = {}
        for round_ in range(rounds):  # interleaved, rotating order: drift on a busy machine hits all tiers
            order = list(calls)[round_ % len(calls):] + list(calls)[:round_ % len(calls)]
            for n in clients:
                for tier in order:
                    results.setdefault((tier, n), []).append(load(calls[tier], n, seconds))
        print(f"\nheadswap Classify per tier (1 JPEG per request; median of {rounds} interleaved rounds x {seconds:.0f} s)")
        print(f"  {'tier':>5} {'clients':>7} {'img/s':>8} {'x fp32':>6} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}")
        median = lambda runs, key: float(np.median([r[key] for r in runs]))
        for n in clients:
            base = median(results[("fp32", n)], "rate")
            for tier in calls:
                runs = results[(tier, n)]
                rate = median(runs, "rate")
                print(f"  {tier:>5} {n:7d} {rate:8.1f} {rate / base:6.2f} {median(runs, 'p50'):7.1f} "
                      f"{median(runs, 'p99'):7.1f} {sum(r['errors'] for r in runs):6d}")
        # The same at 16 clients over KServe V2 with FP32 tensors (no decode in the server), as the
        # peer figures of issue 10 were taken.
        import tritonclient.grpc as triton

        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        _, infer_input = fp32_input(manifest, jpeg)
        kcalls = {tier: (lambda v=version: client.infer(MODEL, [infer_input], model_version=str(v)))
                  for tier, version in versions.items()}
        kresults: dict[str, list[dict]] = {}
        for round_ in range(rounds):
            order = list(kcalls)[round_ % len(kcalls):] + list(kcalls)[:round_ % len(kcalls)]
            for tier in order:
                kresults.setdefault(tier, []).append(load(kcalls[tier], 16, seconds))
        # And with every held-out photo in turn instead of one clear photo: about half of them are near
        # ties that a bf16 tier re-checks in fp32, so this is its slow case.
        heldout = heldout_inputs(manifest)
        mixed = {tier: (lambda v=version: client.infer(MODEL, [next(heldout)], model_version=str(v)))
                 for tier, version in versions.items()}
        for round_ in range(rounds):
            order = list(mixed)[round_ % len(mixed):] + list(mixed)[:round_ % len(mixed)]
            for tier in order:
                kresults.setdefault(f"{tier} held-out", []).append(load(mixed[tier], 16, seconds))
        for label, suffix in (("one clear photo (coffee)", ""), ("the held-out photos in turn", " held-out")):
            base_rate = median(kresults["fp32" + suffix], "rate")
            print(f"\nKServe V2 ModelInfer per tier, FP32 [1,224,224,3], 16 clients, {label}: " + ", ".join(
                f"{tier} {median(kresults[tier + suffix], 'rate'):.1f} img/s "
                f"({median(kresults[tier + suffix], 'rate') / base_rate:.2f}x, p99 "
                f"{median(kresults[tier + suffix], 'p99'):.0f} ms, "
                f"{sum(r['errors'] for r in kresults[tier + suffix])} errors)" for tier in kcalls))
        kbase, mixed_base = median(kresults["fp32"], "rate"), median(kresults["fp32 held-out"], "rate")
        if 16 in clients:
            base = median(results[("fp32", 16)], "rate")
            for tier in tiers:
                print(f"target: {tier} tier at 16 clients >= 1.6x fp32 -> Classify (JPEG) "
                      f"{median(results[(tier, 16)], 'rate') / base:.2f}x, KServe (FP32 tensor) "
                      f"{median(kresults[tier], 'rate') / kbase:.2f}x; held-out photos in turn "
                      f"{median(kresults[tier + ' held-out'], 'rate') / mixed_base:.2f}x")
    finally:
        proc.terminate()
        proc.wait(60)


def protocol_calls(grpc_target: str, http_target: str, tensor: np.ndarray) -> dict[str, Callable[[], None]]:
    """One call per protocol; each load thread gets its own client (tritonclient.http runs on gevent,
    whose hub belongs to one thread). Every answer is checked to be a [1, classes] tensor."""
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http

    local = threading.local()
    datatype = "FP32" if tensor.dtype == np.float32 else "UINT8"

    def call(kind: str) -> None:
        module, target = (triton_http, http_target) if kind == "http" else (triton_grpc, grpc_target)
        if not hasattr(local, kind):
            infer_input = module.InferInput("image", list(tensor.shape), datatype)
            infer_input.set_data_from_numpy(tensor)  # binary data over REST (tritonclient's default)
            outputs = [module.InferRequestedOutput("probabilities")]
            setattr(local, kind, (module.InferenceServerClient(target), infer_input, outputs))
        client, infer_input, outputs = getattr(local, kind)
        answer = client.infer(MODEL, [infer_input], outputs=outputs).as_numpy("probabilities")
        if answer is None or answer.shape[0] != 1:
            raise RuntimeError(f"unexpected answer {answer!r}")

    return {"grpc": lambda: call("grpc"), "http": lambda: call("http")}


def bench_protocols(grpc_target: str, http_target: str, tensor: np.ndarray, clients: list[int], seconds: float,
                    rounds: int, server_pid: int | None) -> None:
    """REST against gRPC on the same server and load, interleaved (order swapped every round); medians."""
    import statistics

    calls = protocol_calls(grpc_target, http_target, tensor)
    for kind in calls:
        for _ in range(5):
            calls[kind]()
    results: dict[tuple[str, int], list[dict]] = {}
    for round_ in range(rounds):
        order = list(calls) if round_ % 2 == 0 else list(calls)[::-1]
        for n in clients:
            for kind in order:
                cpu, mine = cpu_seconds(server_pid) if server_pid else 0.0, time.process_time()
                r = load(calls[kind], n, seconds)
                r["cpu_ms"] = ((cpu_seconds(server_pid) - cpu) * 1000 / max(1, r["n"])) if server_pid else 0.0
                r["client_ms"] = (time.process_time() - mine) * 1000 / max(1, r["n"])
                results.setdefault((kind, n), []).append(r)
    print(f"{tensor.dtype} {list(tensor.shape)} per request, {rounds} rounds x {seconds:g} s, medians "
          f"(gRPC {grpc_target}, REST {http_target}); CPU ms/req: the server's; client CPU: this load generator's")
    print(f"  {'clients':>7} {'protocol':>8} {'img/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'CPU ms/req':>10} "
          f"{'client CPU':>10} {'REST/gRPC':>9}")
    for n in clients:
        rate = {}
        for kind in calls:
            runs = results[(kind, n)]
            rate[kind] = statistics.median(r["rate"] for r in runs)
            ratio = f"{rate['http'] / rate['grpc']:9.2f}" if kind == "http" and rate.get("grpc") else ""
            cpu = f"{statistics.median(r['cpu_ms'] for r in runs):10.2f}" if server_pid else f"{'-':>10}"
            print(f"  {n:7d} {kind:>8} {rate[kind]:8.1f} {statistics.median(r['p50'] for r in runs):7.1f} "
                  f"{statistics.median(r['p99'] for r in runs):7.1f} {sum(r['errors'] for r in runs):6d} {cpu} "
                  f"{statistics.median(r['client_ms'] for r in runs):10.2f} {ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--model-dir", type=Path, help="registry holding efficientnet-lite0 (default: export one)")
    parser.add_argument("--precision", default="", help="fast tiers to measure against fp32, e.g. bf16,int8")
    parser.add_argument("--only-precision", action="store_true", help="measure the tiers only (section 5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the tier and lane sections")
    parser.add_argument("--lanes", action="store_true", help="also compare one inference lane with one per thread")
    parser.add_argument("--only-lanes", action="store_true", help="compare the inference lanes only (section 6)")
    parser.add_argument("--floor", action="store_true", help="also measure headswap against floor_server.py")
    parser.add_argument("--only-floor", action="store_true", help="measure against floor_server.py only (section 7)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc",
                        help="http: REST against gRPC only (section 8)")
    parser.add_argument("--datatype", choices=("FP32", "UINT8"), default="FP32",
                        help="section 8: the image as the model's FP32 input (as the peer harness sends it) or pixels")
    parser.add_argument("--http-target", default="", help="section 8: another server's REST HOST:PORT (a peer's)")
    parser.add_argument("--grpc-target", default="", help="section 8: that server's gRPC HOST:PORT")
    args = parser.parse_args()
    if args.protocol == "http" and args.http_target:  # a peer: nothing of ours to start
        if not args.grpc_target:
            parser.error("--http-target needs --grpc-target (the same server's gRPC port)")
        from skimage import data

        pixels = np.asarray(Image.fromarray(data.chelsea()).resize((224, 224)), dtype=np.uint8)[None]
        tensor = (pixels.astype(np.float32) - 127.0) / 128.0 if args.datatype == "FP32" else pixels
        bench_protocols(args.grpc_target, args.http_target, tensor, [int(c) for c in args.clients.split(",")],
                        args.seconds, args.rounds, None)
        return
    work = Path(tempfile.mkdtemp(prefix="headswap-bench-"))
    model_dir = prepare_registry(work, args.model_dir)
    registry = Registry(model_dir)
    path, manifest = registry.verified_model_path(MODEL, registry.resolve(MODEL))
    jpeg = sample_jpeg()
    print(f"model {MODEL}, JPEG {len(jpeg)} bytes, {os.cpu_count()} CPUs, {args.seconds:.0f} s per point\n")
    tiers = [t for t in args.precision.split(",") if t and t != "fp32"]
    clients = [int(c) for c in args.clients.split(",")]
    if args.protocol == "http":
        proc, port = start_server(model_dir, work, "--role", "inference", "--threads", str(args.threads))
        try:
            tensor, _ = fp32_input(manifest, jpeg)
            if args.datatype == "UINT8":
                prep = Preprocessing.from_manifest(manifest)
                tensor = load_pixels(jpeg, prep.height, prep.width, 10**8)[None]
            bench_protocols(f"127.0.0.1:{port}", f"127.0.0.1:{http_port(work)}", tensor, clients, args.seconds,
                            args.rounds, proc.pid)
        finally:
            proc.terminate()
            proc.wait(60)
            shutil.rmtree(work, ignore_errors=True)
        return
    if args.only_lanes or args.only_floor:
        try:
            section = bench_lanes if args.only_lanes else bench_floor
            section(model_dir, path, manifest, jpeg, clients, args.seconds, args.threads, args.rounds, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    if args.only_precision:
        try:
            bench_precision(model_dir, registry, path, manifest, jpeg, tiers, clients,
                            args.seconds, args.threads, args.rounds, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return

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
        for n in clients:
            r = load(call, n, args.seconds)
            steady[n] = r
            print(f"  {n:7d} {r['rate']:8.1f} {r['rate'] / baseline:6.2f} {r['p50']:7.1f} {r['p99']:7.1f} "
                  f"{r['errors']:6d}")

        import tritonclient.grpc as triton

        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        _, infer_input = fp32_input(manifest, jpeg)
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
    try:
        if args.lanes:
            print()
            bench_lanes(model_dir, path, manifest, jpeg, clients, args.seconds, args.threads, args.rounds, work)
        if args.floor:
            print()
            bench_floor(model_dir, path, manifest, jpeg, clients, args.seconds, args.threads, args.rounds, work)
        if tiers:
            print()
            bench_precision(model_dir, registry, path, manifest, jpeg, tiers, clients,
                            args.seconds, args.threads, args.rounds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
