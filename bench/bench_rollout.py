"""Stable latency with and without a shadow rollout (issue 21: shadow work must not slow stable
answers by more than 10% at p99).

One server with the built-in EfficientNet-Lite0 as version 1 and a copy as version 2. Rounds
alternate two phases under the same load (N clients, each sending one photo per Classify call,
back to back): no rollout, then a manual shadow rollout of version 2 at --percent (aborted at the
end of the phase). Per phase: stable p50/p99 as the clients see them, and the shadow figures
(compared, dropped) from GetRollout. Medians over the rounds, and the p99 ratio.

    PYTHONPATH=$PWD/service .venv/bin/python bench/bench_rollout.py --seconds 10 --rounds 3 --clients 2
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import prepare_registry, start_server  # noqa: E402

from headswap.protocol import headswap_v1_pb2 as pb  # noqa: E402
from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc  # noqa: E402
from headswap.registry.registry import Registry  # noqa: E402

MODEL = "efficientnet-lite0"


def photo() -> bytes:
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def load(target: str, clients: int, seconds: float, image: bytes) -> list[float]:
    """Closed-loop load: each client sends its next request when the last is answered."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client() -> None:
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(target))
        mine = []
        while time.monotonic() < stop:
            started = time.perf_counter()
            answer = stub.Classify(pb.ClassifyRequest(images=[image], model=MODEL, top_k=1), timeout=30)
            mine.append(time.perf_counter() - started)
            assert answer.version == 1
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--percent", type=int, default=50, help="shadow share")
    parser.add_argument("--registry", type=Path, default=None, help="an existing registry to copy (else export)")
    parser.add_argument("--threads", type=int, default=0, help="--threads of the server (0: its default)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = prepare_registry(work, args.registry)
        registry = Registry(model_dir)
        path, manifest = registry.verified_model_path(MODEL, 1)
        copy = work / "copy.onnx"
        copy.write_bytes(path.read_bytes())
        candidate = registry.publish(MODEL, copy, {k: v for k, v in manifest.items()
                                                   if k not in ("name", "version", "sha256", "created")})
        server_args = ["--threads", str(args.threads)] if args.threads else []
        proc, port = start_server(model_dir, work / "server", *server_args)
        target = f"127.0.0.1:{port}"
        models = pb_grpc.ModelsStub(grpc.insecure_channel(target))
        image = photo()
        try:
            load(target, args.clients, 2.0, image)  # warm-up
            rows: dict[str, list[tuple[float, float, int]]] = {"no rollout": [], "shadow": []}
            shadow_figures = []
            for round_ in range(args.rounds):
                for phase in ("no rollout", "shadow"):
                    if phase == "shadow":
                        models.StartRollout(pb.StartRolloutRequest(name=MODEL, version=candidate, mode="shadow",
                                                                   percent=args.percent, manual=True), timeout=60)
                    latencies = np.array(load(target, args.clients, args.seconds, image))
                    rows[phase].append((float(np.percentile(latencies, 50)) * 1000,
                                        float(np.percentile(latencies, 99)) * 1000, len(latencies)))
                    if phase == "shadow":
                        status = models.GetRollout(pb.RolloutRequest(name=MODEL), timeout=30)
                        cand = next(f for f in status.figures if f.role == "candidate")
                        shadow_figures.append((cand.requests, cand.dropped, cand.agreement))
                        models.AbortRollout(pb.RolloutRequest(name=MODEL), timeout=30)
                    p50, p99, count = rows[phase][-1]
                    print(f"round {round_ + 1} {phase:10}: {count} requests, p50 {p50:.1f} ms, p99 {p99:.1f} ms"
                          + (f", shadow ran {shadow_figures[-1][0]}, dropped {shadow_figures[-1][1]}, agreement "
                             f"{shadow_figures[-1][2]:.3f}" if phase == "shadow" else ""), flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    base = {k: statistics.median(r[i] for r in rows["no rollout"]) for i, k in enumerate(("p50", "p99", "n"))}
    shadow = {k: statistics.median(r[i] for r in rows["shadow"]) for i, k in enumerate(("p50", "p99", "n"))}
    print(f"\n{args.clients} clients, shadow {args.percent}%, medians of {args.rounds} rounds of {args.seconds:g} s:")
    print(f"  no rollout: p50 {base['p50']:.1f} ms  p99 {base['p99']:.1f} ms  {base['n'] / args.seconds:.1f} req/s")
    print(f"  shadow    : p50 {shadow['p50']:.1f} ms  p99 {shadow['p99']:.1f} ms  "
          f"{shadow['n'] / args.seconds:.1f} req/s")
    print(f"  stable p99 with shadow / without: {shadow['p99'] / base['p99']:.2f}x")


if __name__ == "__main__":
    main()
