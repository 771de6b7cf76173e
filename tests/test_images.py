"""Issue 8 item 7: every valid image becomes the right RGB pixels; broken ones are refused.

Unit tests on the decoder with real photos (scikit-image), then the same photos through a real
server: a photo and its 16-bit, EXIF-rotated and palette versions get the same top-1.
"""

from __future__ import annotations

import io
import struct
import zlib

import grpc
import numpy as np
import pytest
from PIL import Image
from skimage import data
from tritonclient.grpc import service_pb2, service_pb2_grpc

from conftest import BUILTIN_NAME
from headswap.errors import InvalidInput
from headswap.inference.images import decode, load_pixels, to_pixels
from headswap.protocol import headswap_v1_pb2 as pb
from headswap.protocol import headswap_v1_pb2_grpc as pb_grpc

SIZE = 224


def save(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def pixels(encoded: bytes) -> np.ndarray:
    return load_pixels(encoded, SIZE, SIZE, 10**8).astype(np.int32)


def png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG (grayscale [H, W] or RGB [H, W, 3]) written by hand: Pillow cannot write 48-bit RGB."""
    height, width = array.shape[:2]
    color_type = 0 if array.ndim == 2 else 2
    rows = array.astype(">u2").reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def exif_rotated_jpeg(photo: np.ndarray) -> bytes:
    """Pixels stored turned a quarter (as a phone sensor writes them), orientation 6 so a viewer
    turns them back upright."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return save(Image.fromarray(photo).transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif)


def short_jpeg(photo: np.ndarray) -> bytes:
    """A 600x400 JPEG whose header claims 6000x6000."""
    encoded = bytearray(save(Image.fromarray(photo).resize((600, 400)), "JPEG", quality=90))
    frame = encoded.find(b"\xff\xc0")
    struct.pack_into(">HH", encoded, frame + 5, 6000, 6000)
    return bytes(encoded)


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    return data.chelsea()


# --- the decoder ------------------------------------------------------------------------------

def test_sixteen_bit_grayscale_is_scaled_not_clipped(chelsea):
    gray8 = np.asarray(Image.fromarray(chelsea).convert("L"))
    gray16 = gray8.astype(np.uint16) * 257
    assert Image.open(io.BytesIO(png16(gray16))).mode.startswith("I")
    expected = pixels(save(Image.fromarray(gray8)))
    actual = pixels(png16(gray16))
    assert np.abs(actual - expected).max() <= 1
    assert actual.mean() < 200  # clipped, it would be an all-white square


def test_sixteen_bit_rgb_matches_eight_bit(chelsea):
    assert np.abs(pixels(png16(chelsea.astype(np.uint16) * 257)) - pixels(save(Image.fromarray(chelsea)))).max() <= 1


def test_integer_and_float_modes(chelsea):
    gray8 = np.asarray(Image.fromarray(chelsea).convert("L"))
    expected = to_pixels(Image.fromarray(gray8), SIZE, SIZE).astype(np.int32)
    as_int = Image.fromarray(gray8.astype(np.int32) * 257, "I")
    assert np.abs(to_pixels(as_int, SIZE, SIZE).astype(np.int32) - expected).max() <= 1
    as_float = Image.fromarray(gray8.astype(np.float32), "F")
    assert np.abs(to_pixels(as_float, SIZE, SIZE).astype(np.int32) - expected).max() <= 1


def test_exif_orientation_is_applied(chelsea):
    upright = pixels(save(Image.fromarray(chelsea), "JPEG", quality=95))
    turned = pixels(exif_rotated_jpeg(chelsea))
    assert np.abs(turned - upright).mean() < 6
    no_tag = pixels(save(Image.fromarray(chelsea).transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95))
    assert np.abs(no_tag - upright).mean() > 20  # the check can tell a turned image


def test_palette_cmyk_and_one_bit(chelsea):
    reference = pixels(save(Image.fromarray(chelsea)))
    assert np.abs(pixels(save(Image.fromarray(chelsea).quantize(256))) - reference).mean() < 4
    assert np.abs(pixels(save(Image.fromarray(chelsea).convert("CMYK"), "JPEG", quality=95)) - reference).mean() < 4
    bilevel = Image.fromarray(chelsea).convert("1")
    one_bit = pixels(save(bilevel))
    assert np.array_equal(one_bit, pixels(save(bilevel.convert("L"))))  # black 0, white 255
    assert (one_bit[..., 0] == one_bit[..., 2]).all() and one_bit.min() == 0 and one_bit.max() == 255


def test_transparency_is_composed_over_white(chelsea):
    gray = Image.fromarray(chelsea).convert("L")
    alpha = np.full(gray.size[::-1], 255, dtype=np.uint8)
    alpha[:, : gray.size[0] // 2] = 0  # left half fully transparent (its gray values are still there)
    la = Image.merge("LA", (gray, Image.fromarray(alpha)))
    out = pixels(save(la))
    assert (out[:, :80] == 255).all()  # inside the crop's left part: white
    assert out[:, -60:].mean() < 200  # the opaque part keeps the photo
    palette = Image.fromarray(chelsea).quantize(255)
    index = np.asarray(palette).copy()
    index[:, : index.shape[1] // 2] = 255  # a palette entry marked transparent
    transparent = Image.fromarray(index, "P")
    transparent.putpalette(palette.getpalette() + [0, 0, 0])  # entry 255: black, transparent
    out = pixels(save(transparent, transparency=255))
    assert (out[:, :80] == 255).all()


def test_truncated_images_are_refused(chelsea):
    with pytest.raises(InvalidInput, match="truncated"):
        load_pixels(short_jpeg(chelsea), SIZE, SIZE, 10**8)
    whole = save(Image.fromarray(chelsea))
    with pytest.raises(InvalidInput):
        load_pixels(whole[: len(whole) // 2], SIZE, SIZE, 10**8)
    jpeg = save(Image.fromarray(chelsea), "JPEG", quality=95)
    with pytest.raises(InvalidInput):
        load_pixels(jpeg[: len(jpeg) // 2], SIZE, SIZE, 10**8)
    # A big image that is legitimately small on the wire (flat colour) still decodes.
    flat = save(Image.new("RGB", (3000, 3000), (10, 120, 200)), "JPEG", quality=50)
    assert decode(flat, 10**8).size == (3000, 3000)
    assert load_pixels(flat, SIZE, SIZE, 10**8).shape == (SIZE, SIZE, 3)


# --- through the server -----------------------------------------------------------------------

def top1(server, images: list[bytes]) -> list[int]:
    response = pb_grpc.InferenceStub(server.channel()).Classify(pb.ClassifyRequest(images=images, top_k=1), timeout=60)
    return [r.predictions[0].index for r in response.results]


def test_same_top1_for_every_encoding_of_a_photo(shared_server):
    for photo in (data.chelsea(), data.coffee()):
        image = Image.fromarray(photo)
        gray8 = np.asarray(image.convert("L"))
        original, gray, *variants = top1(shared_server, [
            save(image), save(Image.fromarray(gray8)), png16(gray8.astype(np.uint16) * 257),
            png16(photo.astype(np.uint16) * 257), exif_rotated_jpeg(photo), save(image.quantize(256))])
        sixteen_gray, sixteen_rgb, rotated, palette = variants
        assert sixteen_gray == gray
        assert sixteen_rgb == rotated == palette == original


def normalized(photo: np.ndarray) -> np.ndarray:
    """The built-in model's FP32 input for a photo, as its manifest says: (pixel - 127) / 128."""
    pixels = load_pixels(save(Image.fromarray(photo)), SIZE, SIZE, 10**8).astype(np.float32)
    return (pixels - 127.0) / 128.0


def fp32_infer(server, batch: np.ndarray) -> service_pb2.ModelInferResponse:
    request = service_pb2.ModelInferRequest(model_name=BUILTIN_NAME, raw_input_contents=[batch.tobytes()], inputs=[
        service_pb2.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=list(batch.shape))])
    return service_pb2_grpc.GRPCInferenceServiceStub(server.channel()).ModelInfer(request, timeout=60)


def test_server_refuses_truncated_jpeg_and_fp32_tensors_outside_the_models_input_range(shared_server):
    with pytest.raises(grpc.RpcError) as err:
        top1(shared_server, [short_jpeg(data.chelsea())])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "truncated" in err.value.details()
    photo = normalized(data.chelsea())  # the built-in model takes (pixel - 127) / 128: about -1..1
    for bad, says in ((np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"), (-np.inf, "NaN or infinite"),
                      (3e38, "holds values from"), (-5.0, "holds values from")):
        batch = np.stack([photo, photo])
        batch[1, 5, 5, 1] = bad
        with pytest.raises(grpc.RpcError) as err:
            fp32_infer(shared_server, batch)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (bad, err.value.details())
        assert "image 1" in err.value.details() and says in err.value.details(), err.value.details()
    # raw 0..255 pixels sent as FP32: refused with what the model takes, not answered with garbage
    with pytest.raises(grpc.RpcError) as err:
        fp32_infer(shared_server, data.chelsea()[None, :SIZE, :SIZE].astype(np.float32))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "-0.9922 to 1" in err.value.details() and "UINT8" in err.value.details(), err.value.details()
    # the whole normalised range and a rounding past its ends are served, with finite probabilities
    edges = np.stack([np.full((SIZE, SIZE, 3), value, np.float32) for value in (-1.0, 1.0, -2.9, 2.9)])
    probabilities = np.frombuffer(fp32_infer(shared_server, edges).raw_output_contents[0], np.float32)
    assert probabilities.shape == (4 * 1000,) and np.isfinite(probabilities).all()
