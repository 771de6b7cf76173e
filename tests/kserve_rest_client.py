"""Run by the `kserve` package's own interpreter (it cannot share headswap's venv: kserve 0.21 pins
protobuf 6 and grpcio-tools 1.81): its REST client, unchanged, against a headswap REST port.

    python kserve_rest_client.py HOST:PORT PIXELS.npy   -> prints one JSON line of what it saw
"""

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig


async def main(target: str, pixels_file: str) -> None:
    pixels = np.load(pixels_file)
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    base = f"http://{target}"
    seen = {"ready": await client.is_server_ready(base), "live": await client.is_server_live(base),
            "model_ready": await client.is_model_ready(base, "efficientnet-lite0")}
    for binary in (False, True):
        tensor = InferInput("image", list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(pixels, binary_data=binary)
        response = await client.infer(base, InferRequest(model_name="efficientnet-lite0", infer_inputs=[tensor],
                                                         request_id="k-1"), model_name="efficientnet-lite0")
        probabilities = response.outputs[0].as_numpy()
        seen["binary" if binary else "json"] = {"shape": list(probabilities.shape),
                                                "top": int(probabilities[0].argmax()),
                                                "max": float(probabilities[0].max())}
    try:
        await client.infer(base, InferRequest(model_name="no-such-model", infer_inputs=[tensor]),
                           model_name="no-such-model")
    except Exception as err:  # kserve raises httpx.HTTPStatusError with the server's {"error"}
        seen["error"] = f"{type(err).__name__}: {err}"
    await client.close()
    print(json.dumps(seen))


asyncio.run(main(sys.argv[1], sys.argv[2]))
