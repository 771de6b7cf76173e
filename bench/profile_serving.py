"""Where a KServe request's time goes, per load, and what a serving setting buys (ratios, one run).

Starts one headswap server per variant (a set of `headswap serve` flags, by default the three
`--intra-op-spinning` modes), drives each with Triton's perf_analyzer (C++ client, so the client
costs little CPU) at each concurrency, interleaving variants in rounds, and prints per point:

- throughput and p50/p99 latency, and the ratio to the first variant in the same round;
- the split perf_analyzer derives from headswap's ModelStatistics: gRPC + protobuf + servicer
  ("grpc": perf_analyzer's network + server send/recv), queue, decode (compute input), inference
  (compute infer) and hand-back (compute output), in microseconds per request.

    .venv/bin/python bench/profile_serving.py --concurrency 1,4,16 --seconds 5 --rounds 3
    .venv/bin/python bench/profile_serving.py --variant "" --variant "--max-batch-size 16"

The input is the chelsea photo from scikit-image, preprocessed as the model's FP32 input
(`--input zero` sends zeros). perf_analyzer's libraries come from dev.py (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import prepare_registry, start_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "efficientnet-lite0"
SPLIT = [("grpc", "Network+Server Send/Recv"), ("queue", "Server Queue"), ("decode", "Server Compute Input"),
         ("infer", "Server Compute Infer"), ("output", "Server Compute Output")]


def load_dev():
    spec = importlib.util.spec_from_file_location("headswap_dev", ROOT / "dev.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def input_file(work: Path, model_dir: Path, kind: str) -> list[str]:
    if kind == "zero":
        return ["--input-data", "zero"]
    from skimage import data
    from PIL import Image
    import io

    from headswap.inference.images import Preprocessing, load_pixels

    manifest = json.loads(next(model_dir.glob(f"{MODEL}/*/manifest.json")).read_text())
    preprocessing = Preprocessing.from_manifest(manifest)
    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, format="PNG")
    pixels = load_pixels(buffer.getvalue(), preprocessing.height, preprocessing.width, 40_000_000)
    tensor = preprocessing.normalize(pixels[None])[0].astype(np.float32)
    path = work / "input.json"
    path.write_text(json.dumps({"data": [{"image": {"content": tensor.ravel().tolist(), "shape": list(tensor.shape)}}]}))
    return ["--input-data", str(path)]


def measure(dev, port: int, concurrency: int, seconds: float, data_args: list[str], work: Path) -> dict | None:
    report = work / f"pa-{port}-{concurrency}.csv"
    command = [str(ROOT / ".venv" / "bin" / "perf_analyzer"), "-i", "grpc", "-u", f"127.0.0.1:{port}", "-m", MODEL,
               "--shape", "image:224,224,3", "--concurrency-range", f"{concurrency}:{concurrency}",
               "--measurement-interval", str(int(seconds * 1000)), "--stability-percentage", "100",
               "--max-trials", "3", "-f", str(report), *data_args]
    result = subprocess.run(command, capture_output=True, text=True, env=dev.perf_analyzer_env(), timeout=600)
    if result.returncode != 0 or not report.exists():
        print(f"  perf_analyzer failed on port {port} at concurrency {concurrency}:\n{result.stdout[-800:]}"
              f"{result.stderr[-800:]}", file=sys.stderr)
        return None
    with report.open() as handle:
        (row,) = list(csv.DictReader(handle))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", help="headswap serve flags for one server (repeatable); "
                        "default: --intra-op-spinning off / adaptive / on")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=5.0, help="perf_analyzer measurement window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads for every server")
    parser.add_argument("--input", choices=("photo", "zero"), default="photo")
    parser.add_argument("--model-dir", type=Path, help="an existing registry to copy (default: export afresh)")
    args = parser.parse_args()
    variants = args.variant or [f"--intra-op-spinning {mode}" for mode in ("off", "adaptive", "on")]
    levels = [int(c) for c in args.concurrency.split(",")]

    dev = load_dev()
    dev.ensure_perf_analyzer_libs()
    with tempfile.TemporaryDirectory(prefix="hs-profile-") as tmp:
        work = Path(tmp)
        model_dir = prepare_registry(work, args.model_dir)
        data_args = input_file(work, model_dir, args.input)
        servers = []
        try:
            for i, variant in enumerate(variants):
                server_work = work / f"server{i}"
                server_work.mkdir()
                servers.append(start_server(model_dir, server_work, "--threads", str(args.threads),
                                            *shlex.split(variant)))
            results: dict[tuple[int, int], list[dict]] = {}
            for round_ in range(args.rounds):
                order = list(range(len(variants)))
                order = order[round_ % len(order):] + order[:round_ % len(order)]  # rotate who goes first
                for concurrency in levels:
                    for i in order:
                        row = measure(dev, servers[i][1], concurrency, args.seconds, data_args, work)
                        if row:
                            results.setdefault((i, concurrency), []).append(row)
                            print(f"round {round_ + 1} {variants[i] or 'defaults'!s:32} c={concurrency:<3} "
                                  f"{float(row['Inferences/Second']):7.1f} img/s", flush=True)
        finally:
            for proc, _port in servers:
                proc.terminate()
                proc.wait(30)

    def median(rows: list[dict], key: str) -> float:
        return statistics.median(float(r[key]) for r in rows)

    print(f"\nmedians over {args.rounds} rounds; ratio = img/s / the first variant's at the same concurrency")
    header = "variant                          conc   img/s  ratio  p50 ms  p99 ms | " + " ".join(
        f"{name:>7}" for name, _ in SPLIT) + "  (us per request)"
    print(header)
    for concurrency in levels:
        base = results.get((0, concurrency))
        for i, variant in enumerate(variants):
            rows = results.get((i, concurrency))
            if not rows:
                print(f"{variant or 'defaults'!s:32} {concurrency:>4}  (no result)")
                continue
            rate = median(rows, "Inferences/Second")
            ratio = rate / median(base, "Inferences/Second") if base else float("nan")
            split = " ".join(f"{median(rows, key):7.0f}" for _, key in SPLIT)
            print(f"{variant or 'defaults'!s:32} {concurrency:>4} {rate:7.1f} {ratio:5.2f}x "
                  f"{median(rows, 'p50 latency') / 1000:7.1f} {median(rows, 'p99 latency') / 1000:7.1f} | {split}")


if __name__ == "__main__":
    main()
