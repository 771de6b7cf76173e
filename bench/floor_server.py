#!/usr/bin/env python3
"""The least a Python KServe V2 server can do per request: the floor that bench_serving's
`--floor` section measures headswap against.

    python bench/floor_server.py MODEL.onnx --threads 2 [--echo]

One synchronous gRPC server (the same grpcio as headswap), ModelInfer only: the FP32 tensor is
read with np.frombuffer and run on one ONNX Runtime session with intra-op spinning on, nothing
else (no batching, checks, metrics, auth or logging). With --echo it skips ORT and answers a
reply computed once at start: what transport alone costs. Prints "listening on port N" when ready.
It is a measuring stick, not a server to deploy.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import onnxruntime as ort

from headswap.protocol import kserve_v2_pb2 as kserve_pb
from headswap.protocol import kserve_v2_pb2_grpc as kserve_grpc


class FloorServicer(kserve_grpc.GRPCInferenceServiceServicer):
    """ModelInfer on one ORT session (or one fixed reply with `echo`)."""

    def __init__(self, session: ort.InferenceSession, echo: bool) -> None:
        self.session = session
        self.input = session.get_inputs()[0]
        self.shape = [d if isinstance(d, int) else 1 for d in self.input.shape]
        self.output = session.get_outputs()[0].name
        zeros = np.zeros(self.shape, np.float32)
        self.fixed = session.run([self.output], {self.input.name: zeros})[0] if echo else None

    def ModelInfer(self, request: kserve_pb.ModelInferRequest, context: grpc.ServicerContext
                   ) -> kserve_pb.ModelInferResponse:
        if self.fixed is not None:
            result = self.fixed
        else:
            shape = list(request.inputs[0].shape)
            images = np.frombuffer(request.raw_input_contents[0], dtype=np.float32).reshape(shape)
            result = self.session.run([self.output], {self.input.name: images})[0]
        reply = kserve_pb.ModelInferResponse(model_name=request.model_name)
        reply.outputs.add(name=self.output, datatype="FP32", shape=list(result.shape))
        reply.raw_output_contents.append(result.tobytes())
        return reply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="ONNX file")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--echo", action="store_true", help="answer a fixed reply: transport only")
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    server = grpc.server(ThreadPoolExecutor(32), options=[("grpc.max_receive_message_length", 64 << 20)])
    kserve_grpc.add_GRPCInferenceServiceServicer_to_server(FloorServicer(session, args.echo), server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print(f"listening on port {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
