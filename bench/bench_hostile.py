#!/usr/bin/env python3
"""Hostile-caller benchmark (issue 8): a victim's latency while an attacker abuses the server.

    .venv/bin/python bench/bench_hostile.py [--seconds 10] [--model-dir REG] [--attacks tiny256,bigpng,...]

One server (the built-in EfficientNet-Lite0, exported into a temporary registry unless
--model-dir is given). A victim client classifies one real photo (coffee, 600x400 JPEG) in a
loop; a health checker calls grpc.health.v1 Check. First alone (steady), then while an attacker
runs each abuse from the issue:

- tiny256:  Classify with 256 copies of a 1x1 PNG, in a loop (2 attackers);
- bigpng:   Classify with 6000x6000 PNGs (36 Mpx each) and a 3 s deadline (2 attackers); also
            reports the server's CPU use in the second after the attack stops;
- names:    Classify with a new unique model name per call (4 attackers); reports /metrics size;
- aliases:  Classify rotating aliases of the real model (efficientnet-lite0/, ./efficientnet-lite0,
            efficientnet-lite0/1/.., the model directory's absolute path) (4 attackers);
- idle:     200 FineTune streams opened and left idle;
- uploads:  4 FineTune streams each uploading 36 Mpx PNGs (cancelled before they finish, so no
            job is trained);
- stalled:  300 unary calls (health Check, Classify, ModelInfer) that send their headers and never
            their message, re-opened as they end (--request-arrival-timeout-s is 5 s here);
- watch:    300 grpc.health.v1 Watch streams, each re-opened 5 s after it opens or when refused;
- conns:    5,000 TCP connections that never speak, re-opened as they close (the victim's
            connection is open before; new ones are refused while the flood fills --max-connections);
- bigmsg:   2 attackers each sending 32 concurrent 15 MB Classify requests, in a loop;
- badcalls: 4 attackers sending Classify for unknown models and bodies that are not protobuf; the
            row reports how much the server log grew;
- reset:    rapid reset (CVE-2023-44487): one raw HTTP/2 connection at a time (the h2 package)
            sending HEADERS + RST_STREAM(CANCEL) pairs for Classify as fast as it can, reconnecting
            each time the server sends it away (attacker codes: connections, GOAWAYs, streams);
- pinned:   8 attackers each calling Classify on a pinned version of 6 (2 extra models x 3
            versions, published before the server starts), against --max-loaded-models 3.

Prints, per phase: victim p50/p99 (ms) and their ratio to steady, victim errors, health p99,
attacker status codes, the server's resident memory (end and peak), its peak open files, and how
much its log grew. Figures, not assertions. The server listens on both IPv4 and IPv6; the victim
and the health checker connect over 127.0.0.1 and the attackers over [::1], so the server sees two
client addresses, as it would two hosts (its per-address bounds apply to the attackers only).
"""

from __future__ import annotations

import argparse
import collections
import io
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_seconds, prepare_registry, start_server  # noqa: E402

from headswap.protocol import headswap_v1_pb2 as pb  # noqa: E402
from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc  # noqa: E402

MODEL = "efficientnet-lite0"
ATTACKS = ("tiny256", "bigpng", "names", "aliases", "idle", "uploads", "stalled", "watch", "conns", "bigmsg",
           "badcalls", "reset", "pinned")
PINNED = [(name, version) for name in ("pin-a", "pin-b") for version in (1, 2, 3)]


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def victim_photo() -> bytes:
    from skimage import data

    return encoded(Image.fromarray(data.coffee()), "JPEG", quality=90)


def big_png(side: int = 6000) -> bytes:
    ramp = (np.add.outer(np.arange(side), np.arange(side)) % 256).astype(np.uint8)
    return encoded(Image.fromarray(np.stack([ramp, ramp[::-1], ramp.T], axis=-1)), "PNG", compress_level=1)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_files(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class Phase:
    """Victim + health checker for `seconds`, while `attack` (if any) runs in its own threads."""

    def __init__(self, target: str, attacker_target: str, pid: int, photo: bytes, seconds: float,
                 log_path: Path) -> None:
        self.target, self.attacker_target, self.pid = target, attacker_target, pid
        self.photo, self.seconds, self.log_path = photo, seconds, log_path

    def run(self, attack=None) -> dict:
        stop = threading.Event()
        latencies: list[float] = []
        health_latencies: list[float] = []
        errors: collections.Counter = collections.Counter()
        attacker_codes: collections.Counter = collections.Counter()
        peak = [rss_mb(self.pid)]
        peak_files = [open_files(self.pid)]
        log_before = self.log_path.stat().st_size
        # long-lived clients, connected before the attack starts (as gRPC clients keep their channels)
        channel = grpc.insecure_channel(self.target)
        stub = pb_grpc.InferenceStub(channel)
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(self.target))
        stub.Classify(pb.ClassifyRequest(images=[self.photo], top_k=1), timeout=30)
        health.Check(health_pb2.HealthCheckRequest(), timeout=30)

        def victim() -> None:
            request = pb.ClassifyRequest(images=[self.photo], top_k=1)
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    stub.Classify(request, timeout=10)
                    latencies.append(time.perf_counter() - started)
                except grpc.RpcError as err:
                    errors[err.code().name] += 1

        def checker() -> None:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    health_latencies.append(time.perf_counter() - started)
                except grpc.RpcError as err:
                    errors[f"health {err.code().name}"] += 1
                stop.wait(0.1)

        def sampler() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mb(self.pid))
                peak_files[0] = max(peak_files[0], open_files(self.pid))
                stop.wait(0.25)

        threads = [threading.Thread(target=f, daemon=True) for f in (victim, checker, sampler)]
        attackers = attack(self.attacker_target, stop, attacker_codes) if attack else []
        time.sleep(0.5 if attack else 0)  # let the attack take hold before measuring
        latencies.clear()
        for thread in threads:
            thread.start()
        time.sleep(self.seconds)
        stop.set()
        for thread in threads + attackers:
            thread.join(30)
        cpu_before = cpu_seconds(self.pid)
        time.sleep(1.0)
        after_cpu = cpu_seconds(self.pid) - cpu_before
        channel.close()
        return {"p50": percentile(latencies, 50) * 1000, "p99": percentile(latencies, 99) * 1000,
                "calls": len(latencies), "errors": dict(errors), "health_p99": percentile(health_latencies, 99) * 1000,
                "attacker": dict(attacker_codes), "rss": rss_mb(self.pid), "peak_rss": peak[0], "cpu_after": after_cpu,
                "files": peak_files[0], "log_kb": (self.log_path.stat().st_size - log_before) / 1024}


def started(target, count: int) -> list[threading.Thread]:
    """`count` daemon threads running target(n), started: an attack's attackers."""
    threads = [threading.Thread(target=target, args=(n,), daemon=True) for n in range(count)]
    for thread in threads:
        thread.start()
    return threads


def tally(codes: collections.Counter, call, *args, **kwargs) -> None:
    """Make one attacker call and count how it ended: OK or its status code."""
    try:
        call(*args, **kwargs)
        codes["OK"] += 1
    except grpc.RpcError as err:
        codes[err.code().name] += 1


def looping(target: str, stop: threading.Event, codes: collections.Counter, threads: int, make_call) -> list:
    """`threads` attackers each calling make_call(stub, i) until stop."""

    def attacker(n: int) -> None:
        channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 256 << 20)])
        stub = pb_grpc.InferenceStub(channel)
        i = 0
        while not stop.is_set():
            tally(codes, make_call, stub, n * 1_000_000 + i)
            i += 1
        channel.close()

    return started(attacker, threads)


def attack_tiny256(target, stop, codes):
    tiny = encoded(Image.new("RGB", (1, 1), (200, 30, 40)), "PNG")
    request = pb.ClassifyRequest(images=[tiny] * 256, top_k=1)
    return looping(target, stop, codes, 2, lambda stub, i: stub.Classify(request, timeout=60))


def attack_bigpng(target, stop, codes):
    big = big_png()
    admitted = pb.ClassifyRequest(images=[big] * 3, top_k=1)  # 108 Mpx: under the 120 Mpx request budget
    flood = pb.ClassifyRequest(images=[big] * 48, top_k=1)  # the request: refused by the budget

    def call(stub, i):
        stub.Classify(flood if i % 4 == 3 else admitted, timeout=3)

    return looping(target, stop, codes, 2, call)


def attack_names(target, stop, codes):
    return looping(target, stop, codes, 4, lambda stub, i: stub.Classify(
        pb.ClassifyRequest(images=[b"x"], model=f"model-{i}"), timeout=10))


def attack_aliases(model_dir: Path):
    aliases = [f"{MODEL}/", f"./{MODEL}", f"{MODEL}/1/..", str(model_dir / MODEL), f"{MODEL}//"]

    def attack(target, stop, codes):
        photo = encoded(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
        return looping(target, stop, codes, 4, lambda stub, i: stub.Classify(
            pb.ClassifyRequest(images=[photo], model=aliases[i % len(aliases)]), timeout=10))

    return attack


def attack_idle(target, stop, codes, streams: int = 200):
    channel = grpc.insecure_channel(target)
    call = channel.stream_unary("/headswap.v1.Training/FineTune", request_serializer=None,
                                response_deserializer=None)

    def idle():
        stop.wait()
        return
        yield  # a generator that sends nothing until the phase ends

    futures = [call.future(idle(), timeout=120) for _ in range(streams)]

    def collect() -> None:
        stop.wait()
        for future in futures:
            future.cancel()
        for future in futures:
            count_outcome(future, codes, "CANCELLED (by us, still open at the end)")
        channel.close()

    thread = threading.Thread(target=collect, daemon=True)
    thread.start()
    return [thread]


def count_outcome(future, codes, cancelled: str) -> None:
    """Count how an attacker's call future ended: OK, cancelled by us, or its status code."""
    try:
        future.result(timeout=10)
        codes["OK"] += 1
    except grpc.FutureCancelledError:
        codes[cancelled] += 1
    except grpc.RpcError as err:
        codes[err.code().name] += 1
    except Exception as err:  # a future that never finished
        codes[type(err).__name__] += 1


def attack_uploads(target, stop, codes, streams: int = 4):
    big = big_png()
    config = pb.FineTuneRequest(config=pb.FineTuneConfig(base_model=MODEL, name="bench-hostile-upload", epochs=1))

    def upload(_: int) -> None:
        channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 256 << 20)])
        stub = pb_grpc.TrainingStub(channel)
        while not stop.is_set():
            def requests():
                yield config
                for i in range(200):  # never finishes normally: cancelled when the phase ends
                    if stop.is_set():
                        return
                    yield pb.FineTuneRequest(batch=pb.ExampleBatch(examples=[
                        pb.Example(image=big, label=f"class{i % 2}")]))
                stop.wait()

            future = stub.FineTune.future(requests(), timeout=120)
            stop.wait()
            future.cancel()
            count_outcome(future, codes, "CANCELLED (by us)")
        channel.close()

    return started(upload, streams)


def attack_stalled(target, stop, codes, calls: int = 300):
    methods = ["/grpc.health.v1.Health/Check", "/headswap.v1.Inference/Classify",
               "/inference.GRPCInferenceService/ModelInfer"]
    channels = [grpc.insecure_channel(target) for _ in range(4)]

    def nothing():
        stop.wait()
        return
        yield

    def keep(n: int) -> None:
        call = channels[n % 4].stream_unary(methods[n % 3], request_serializer=None, response_deserializer=None)
        while not stop.is_set():
            future = call.future(nothing(), timeout=120)
            while not future.done() and not stop.is_set():
                time.sleep(0.05)
            future.cancel()
            count_outcome(future, codes, "CANCELLED (by us)")

    return started(keep, calls)


def attack_watch(target, stop, codes, streams: int = 300):
    channels = [grpc.insecure_channel(target) for _ in range(4)]

    def keep(n: int) -> None:
        health = health_pb2_grpc.HealthStub(channels[n % 4])
        while not stop.is_set():
            stream = health.Watch(health_pb2.HealthCheckRequest(), timeout=5)
            try:
                for _ in stream:
                    if stop.is_set():
                        break
                codes["ended"] += 1
            except grpc.RpcError as err:
                codes[err.code().name] += 1
                stop.wait(0.2)
            stream.cancel()

    return started(keep, streams)


def attack_conns(target, stop, codes, connections: int = 5000):
    host, port = target.rsplit(":", 1)
    host = host.strip("[]")

    def flood() -> None:
        sockets = []
        while not stop.is_set():
            sockets = [s for s in sockets if s.fileno() != -1]
            while len(sockets) < connections and not stop.is_set():
                try:
                    sockets.append(socket.create_connection((host, int(port)), timeout=5))
                    codes["connected"] += 1
                except OSError as err:
                    codes[type(err).__name__] += 1
                    break
            for sock in list(sockets):  # drop the ones the server closed
                sock.setblocking(False)
                try:
                    if sock.recv(65536) == b"":
                        codes["closed by the server"] += 1
                        sock.close()
                        sockets.remove(sock)
                except BlockingIOError:
                    pass
                except OSError:
                    codes["closed by the server"] += 1
                    sock.close()
                    sockets.remove(sock)
            stop.wait(0.5)
        for sock in sockets:
            sock.close()

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    return [thread]


def raw_classify(channel: grpc.Channel):
    """Classify taking and answering bytes: for bodies the generated stub would not send."""
    return channel.unary_unary("/headswap.v1.Inference/Classify", request_serializer=None,
                               response_deserializer=None)


def attack_bigmsg(target, stop, codes, attackers: int = 2, concurrent: int = 32):
    body = pb.ClassifyRequest(images=[b"\x89PNG" + b"\0" * (15 << 20)], top_k=1).SerializeToString()

    def attacker(_: int) -> None:
        channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 256 << 20)])
        call = raw_classify(channel)
        with ThreadPoolExecutor(concurrent) as pool:
            while not stop.is_set():
                list(pool.map(lambda _: tally(codes, call, body, timeout=60), range(concurrent)))
        channel.close()

    return started(attacker, attackers)


def attack_badcalls(target, stop, codes, attackers: int = 4):
    unknown = pb.ClassifyRequest(images=[b"x"], model="no-such-model").SerializeToString()

    def attacker(_: int) -> None:
        channel = grpc.insecure_channel(target)
        call = raw_classify(channel)
        i = 0
        while not stop.is_set():  # alternately: an unknown model, and a body that is not protobuf
            tally(codes, call, unknown if i % 2 else b"\xff\xff\xff\xff", timeout=10)
            i += 1
        channel.close()

    return started(attacker, attackers)


def attack_reset(target, stop, codes):
    """Rapid reset, reconnecting whenever the server sends the connection away."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from hostile import rapid_reset

    host, port = target.rsplit(":", 1)

    def attacker(_: int) -> None:
        while not stop.is_set():
            result = rapid_reset(host.strip("[]"), int(port), seconds=5, stop=stop)
            codes["connections"] += 1
            codes["GOAWAY"] += int(result.goaway)
            codes["streams"] += result.streams

    return started(attacker, 1)


def publish_pinned(model_dir: Path) -> None:
    """The versions the `pinned` attack names: copies of the built-in model (same weights)."""
    from headswap.registry.registry import Registry

    registry = Registry(model_dir)
    onnx, manifest = registry.verified_model_path(MODEL, registry.resolve(MODEL))
    base = {k: v for k, v in manifest.items() if k not in ("name", "version", "sha256", "created")}
    for name in sorted({name for name, _ in PINNED}):
        for _ in range(3):
            registry.publish(name, onnx, dict(base), activate=True)


def attack_pinned(photo: bytes):
    def attack(target, stop, codes):
        def call(stub, i):
            name, version = PINNED[i % len(PINNED)]
            stub.Classify(pb.ClassifyRequest(model=name, version=version, images=[photo], top_k=1), timeout=30)
        return looping(target, stop, codes, 8, call)
    return attack


def metrics_bytes(log_path: Path) -> int:
    match = re.search(r"metrics on (\d+)", log_path.read_text(errors="replace"))
    if not match:
        return -1
    with urllib.request.urlopen(f"http://127.0.0.1:{match.group(1)}/metrics", timeout=30) as response:
        return len(response.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--model-dir", type=Path, help="an existing registry holding efficientnet-lite0")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated subset of {ATTACKS}")
    args = parser.parse_args()
    chosen = [a for a in args.attacks.split(",") if a]
    unknown = set(chosen) - set(ATTACKS)
    if unknown:
        parser.error(f"unknown attacks {sorted(unknown)}; choose from {ATTACKS}")

    work = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    try:
        model_dir = prepare_registry(work, args.model_dir)
        if "pinned" in chosen:
            publish_pinned(model_dir)
        proc, port = start_server(model_dir, work, "--metrics-port", "0", "--threads", "2", "--host", "[::]",
                                  "--metrics-host", "127.0.0.1", "--request-arrival-timeout-s", "5",
                                  "--max-loaded-models", "3")
        target, attacker_target = f"127.0.0.1:{port}", f"[::1]:{port}"
        try:
            photo = victim_photo()
            phase = Phase(target, attacker_target, proc.pid, photo, args.seconds, work / "server.log")
            for _ in range(20):  # warm-up
                pb_grpc.InferenceStub(grpc.insecure_channel(target)).Classify(
                    pb.ClassifyRequest(images=[photo], top_k=1), timeout=30)
            steady = phase.run()
            rows = [("steady", steady)]
            metrics_before = metrics_bytes(work / "server.log")
            attacks = {"tiny256": attack_tiny256, "bigpng": attack_bigpng, "names": attack_names,
                       "aliases": attack_aliases(model_dir), "idle": attack_idle, "uploads": attack_uploads,
                       "stalled": attack_stalled, "watch": attack_watch, "conns": attack_conns,
                       "bigmsg": attack_bigmsg, "badcalls": attack_badcalls, "reset": attack_reset,
                       "pinned": attack_pinned(photo)}
            for name in chosen:
                rows.append((name, phase.run(attacks[name])))
            print(f"\nvictim: Classify of one 600x400 JPEG in a loop; {args.seconds:.0f} s per phase; "
                  f"server pid {proc.pid}")
            print(f"{'phase':9} {'p50 ms':>8} {'p99 ms':>8} {'p50 x':>6} {'p99 x':>6} {'calls':>6} "
                  f"{'health p99':>10} {'RSS MB':>7} {'peak':>6} {'files':>6} {'log KB':>7} {'CPU-s 1s after':>14}  "
                  "victim errors / attacker codes")
            for name, r in rows:
                print(f"{name:9} {r['p50']:8.1f} {r['p99']:8.1f} {r['p50'] / steady['p50']:6.2f} "
                      f"{r['p99'] / steady['p99']:6.2f} {r['calls']:6d} {r['health_p99']:10.1f} {r['rss']:7.0f} "
                      f"{r['peak_rss']:6.0f} {r['files']:6d} {r['log_kb']:7.0f} {r['cpu_after']:14.2f}  "
                      f"{r['errors'] or '-'} / {r['attacker'] or '-'}")
            if "names" in chosen:
                print(f"/metrics: {metrics_before} bytes before the attacks, {metrics_bytes(work / 'server.log')} after")
        finally:
            proc.terminate()
            proc.wait(60)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
