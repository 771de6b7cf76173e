"""The fast precision tiers: bf16 and int8 versions of an fp32 ONNX model, with gated accuracy.

Runtime per tier, chosen by measurement on an AVX-512 BF16/VNNI CPU (2 threads, EfficientNet-Lite0,
inference alone, ratios to ONNX Runtime fp32 in one run; bench/bench_serving.py --precision):
OpenVINO f32 0.91x (no gain); OpenVINO bf16 1.32-1.48x at batch 1 and 1.69-1.82x at batch 8 (two
runs); an int8 QDQ file from ONNX Runtime's static quantizer 1.25x in ONNX Runtime (slower at batch 8)
and 1.66-1.77x / 2.47-2.96x in OpenVINO. ONNX Runtime has no fast bf16 CPU kernels. So both tiers are
served by OpenVINO:
- bf16: the fp32 file unchanged, compiled by OpenVINO with a bf16 inference precision;
- int8: ONNX Runtime's static quantizer (QDQ, per-channel int8 weights, uint8 activations),
  calibrated on real images, then compiled by OpenVINO.

Near ties: reduced precision flips the top-1 of images on which fp32 itself is near a tie (on the
shipped held-out photos bf16 flipped 22 of 268, each with fp32's lead over its runner-up at most
0.07; int8 flipped 62; marking ops to stay in f32 changed nothing in OpenVINO's CPU plugin). So both
tiers re-check: an image whose tier top-1 leads its runner-up by no more than `recheck.margin` is
run again in fp32 (ONNX Runtime) and answered with fp32's probabilities. bf16 re-checks on its own
file (it is the fp32 file); an int8 version carries the fp32 file beside its quantized one
(`registry.RECHECK_FILE`). The margin is the largest lead the tier had on a calibration image whose
top-1 it flipped, so every flip seen in calibration would have been re-checked. Clear images stay
at the tier's speed; the share re-checked on the held-out photos goes into the manifest (built-in
model: bf16 margin 0.058, about half of these texture-heavy photos; int8 margin 0.19, about three
quarters). Where near ties are common the server runs whole batches in fp32 instead, while that
measures faster (`OpenVinoRuntime.infer`).

Every tier is measured against the fp32 model before it is published, and refused below the gate,
on what the tier serves (after its re-check):
- zero-shot: top-1 agreement with fp32 on every held-out real photo (never the calibration photos);
- fine-tune: validation accuracy of the tier against the fp32 model's, on the job's own
  validation images (calibrated on its training images).
The figures go into the manifest (`accuracy`, `recheck`), and into the refusal message.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from headswap.errors import FailedPrecondition, InvalidInput, shown_name
from headswap.registry.registry import RECHECK_FILE

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "int8")
RUNTIME = {"fp32": "onnxruntime", "bf16": "openvino", "int8": "openvino"}
INT8_FILE = "model.int8.onnx"
EVAL_BATCH = 16
FLOAT_OPS = ("Softmax", "Gemm", "MatMul")  # int8: kept in float (see quantize_int8)
MAX_CALIBRATION_IMAGES = 128  # the quantizer holds their activations in memory
MIN_HELDOUT_IMAGES = 20  # zero-shot: fewer held-out images than this measure nothing


@dataclass(frozen=True)
class BuiltTier:
    """What a tier publishes: the file to serve, the manifest fields to add, and the other files
    the version carries (`Registry.publish(extra_files=...)`)."""

    path: Path
    fields: dict[str, Any]
    extra_files: dict[str, Path] = field(default_factory=dict)


# A precision tier step, as the exporter and the trainer take it: the checked fp32 file and its manifest.
Tier = Callable[[Path, dict[str, Any]], BuiltTier]


@dataclass(frozen=True)
class Gate:
    """What a tier must keep of the fp32 model's answers to be published."""

    min_agreement: float = 0.99  # zero-shot: share of held-out images answered with fp32's top-1
    max_accuracy_drop: float = 0.005  # fine-tune: validation accuracy lost, as a fraction (0.005 = 0.5 points)

    def check(self) -> "Gate":
        if not 0.0 <= self.min_agreement <= 1.0:
            raise InvalidInput(f"min_agreement must be between 0 and 1, got {self.min_agreement}")
        if not 0.0 <= self.max_accuracy_drop <= 1.0:
            raise InvalidInput(f"max_accuracy_drop must be between 0 and 1, got {self.max_accuracy_drop}")
        return self


class PrecisionRefused(FailedPrecondition):
    """A tier that misses its accuracy gate, or that this machine cannot build: nothing is published."""


def check_precision(precision: str) -> str:
    precision = (precision or "fp32").strip().lower()
    if precision not in PRECISIONS:
        raise InvalidInput(f"precision must be one of {', '.join(PRECISIONS)}, got {shown_name(precision)}")
    return precision


def check_available(precision: str, capabilities: list[str] | None = None) -> None:
    """Refuse early (before a slow export or training) a tier this machine cannot build or run fast.

    `capabilities` defaults to what OpenVINO reports for this CPU."""
    precision = check_precision(precision)
    if precision == "fp32":
        return
    from headswap.inference import openvino_runtime

    try:
        if capabilities is None:
            capabilities = openvino_runtime.cpu_capabilities()
    except openvino_runtime.OpenVinoMissing as err:
        raise PrecisionRefused(f"the {precision} tier runs in OpenVINO: {err}") from None
    needed = {"bf16": "BF16", "int8": "INT8"}[precision]
    if needed not in capabilities:
        raise PrecisionRefused(f"this CPU has no native {precision} (OpenVINO reports {', '.join(capabilities)}): "
                               f"a {precision} tier would run no faster than fp32; use precision fp32")


def make_tier(onnx_path: Path, precision: str, calibration: np.ndarray, heldout: np.ndarray,
              labels: np.ndarray | None = None, gate: Gate = Gate(), threads: int = 0) -> BuiltTier:
    """Build the `precision` tier of an fp32 ONNX model and gate it.

    `calibration` and `heldout` are model inputs (float32 NHWC, already normalised) from disjoint
    images. With `labels` (one class index per held-out image) the gate is the validation-accuracy
    drop (fine-tune); without, top-1 agreement with fp32 (zero-shot). The int8 file is written
    beside `onnx_path`. Raises PrecisionRefused with the measured figures when the gate is missed.
    """
    precision = check_precision(precision)
    gate.check()
    if precision == "fp32":
        return BuiltTier(onnx_path, {"precision": "fp32", "runtime": RUNTIME["fp32"]})
    from headswap.inference import openvino_runtime

    check_available(precision)
    if len(heldout) == 0 or len(calibration) == 0:
        raise PrecisionRefused(f"the {precision} tier needs calibration and held-out images; got "
                               f"{len(calibration)} and {len(heldout)}")
    started = time.monotonic()
    quantization: dict[str, Any] = {}
    if precision == "int8":
        tier_path = onnx_path.with_name(INT8_FILE)
        quantization = quantize_int8(onnx_path, tier_path, calibration)
    else:
        tier_path = onnx_path  # OpenVINO runs the fp32 file in bf16
    built = time.monotonic()
    compiled = openvino_runtime.compile_model(tier_path, precision, threads)
    fp32 = fp32_session(onnx_path, threads)
    margin = recheck_margin(ort_probabilities(fp32, calibration), openvino_probabilities(compiled, calibration))
    reference = ort_probabilities(fp32, heldout)
    tier = openvino_probabilities(compiled, heldout)
    rechecked = openvino_runtime.needs_recheck(tier, margin)
    accuracy = measure(reference, np.where(rechecked[:, None], reference, tier), labels)
    accuracy["tier_alone"] = measure(reference, tier, labels)
    accuracy["seconds"] = round(time.monotonic() - built, 2)
    accuracy["gate"] = {k: v for k, v in asdict(gate).items()
                        if (k == "max_accuracy_drop") == (labels is not None)}
    extra_files = {RECHECK_FILE: onnx_path} if tier_path != onnx_path else {}
    fields: dict[str, Any] = {
        "precision": precision, "runtime": RUNTIME[precision], "accuracy": accuracy,
        "recheck": {"margin": round(margin, 6),
                    "engine": f"onnxruntime fp32, {RECHECK_FILE if extra_files else 'same file'}",
                    "heldout_share": round(float(rechecked.mean()), 6)}}
    message = gate_failure(precision, fields, gate, labels is not None)
    if message:
        raise PrecisionRefused(message)
    if quantization:
        fields["quantization"] = {**quantization, "seconds": round(built - started, 2)}
    log.info("%s tier passed its gate: %s", precision, {k: v for k, v in fields.items() if k != "runtime"})
    return BuiltTier(tier_path, fields, extra_files)


def recheck_margin(reference: np.ndarray, tier: np.ndarray) -> float:
    """The largest lead of the tier's top-1 over its runner-up on a calibration image where that top-1
    is not fp32's: re-checking every answer that leads by no more would have caught every flip seen.
    0.0 when the tier flipped nothing (only exact ties are then re-checked)."""
    from headswap.inference.openvino_runtime import top1_lead

    flipped = reference.argmax(axis=1) != tier.argmax(axis=1)
    return float(top1_lead(tier[flipped]).max()) if flipped.any() else 0.0


def measure(reference: np.ndarray, tier: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    """Agreement of the tier's top-1 with fp32's, and the accuracy of both when labels are known."""
    ref_top1, tier_top1 = reference.argmax(axis=1), tier.argmax(axis=1)
    figures: dict[str, Any] = {
        "heldout_images": int(len(reference)),
        "top1_agreement": round(float((ref_top1 == tier_top1).mean()), 6),
        "max_abs_diff": round(float(np.max(np.abs(reference - tier))), 6),
    }
    if labels is not None:
        labels = np.asarray(labels)
        fp32_accuracy = float((ref_top1 == labels).mean())
        tier_accuracy = float((tier_top1 == labels).mean())
        figures.update(fp32_accuracy=round(fp32_accuracy, 6), accuracy=round(tier_accuracy, 6),
                       accuracy_drop=round(fp32_accuracy - tier_accuracy, 6))
    return figures


def gate_failure(precision: str, fields: dict[str, Any], gate: Gate, fine_tune: bool) -> str:
    """The refusal message with the figures, or '' when the tier passes. `fields`: make_tier's."""
    figures = fields["accuracy"]
    recheck = fields.get("recheck")
    served = (f" ({precision} alone: {100 * figures['tier_alone']['top1_agreement']:.1f}%; "
              f"{100 * recheck['heldout_share']:.1f}% of them re-checked in fp32)") if recheck else ""
    if fine_tune:
        if figures["accuracy_drop"] <= gate.max_accuracy_drop + 1e-12:
            return ""
        return (f"the {precision} tier loses {100 * figures['accuracy_drop']:.2f} points of validation accuracy "
                f"({100 * figures['fp32_accuracy']:.2f}% fp32 -> {100 * figures['accuracy']:.2f}% {precision} on "
                f"{figures['heldout_images']} validation images; gate: at most "
                f"{100 * gate.max_accuracy_drop:.2f} points); nothing published: train with precision fp32")
    if figures["heldout_images"] >= MIN_HELDOUT_IMAGES and figures["top1_agreement"] >= gate.min_agreement - 1e-12:
        return ""
    return (f"the {precision} tier misses its accuracy gate: it answers fp32's top-1 on "
            f"{100 * figures['top1_agreement']:.1f}% of {figures['heldout_images']} held-out real images{served}; "
            f"gate: >= {100 * gate.min_agreement:.1f}% over at least {MIN_HELDOUT_IMAGES} images. Nothing "
            f"published: export fp32, or lower the gate (--min-agreement)")


def quantize_int8(source: Path, target: Path, calibration: np.ndarray) -> dict[str, Any]:
    """ONNX Runtime's static quantizer: QDQ, per-channel int8 weights, uint8 activations with min-max
    ranges over (at most MAX_CALIBRATION_IMAGES of) the calibration images. The file stays a standard ONNX
    graph (QuantizeLinear/DequantizeLinear). Measured on the built-in model: percentile ranges agreed
    with fp32 a little more often (78.4% against 76.9% top-1 on all held-out photos) but kept every
    activation of every image in memory (GBs); neither passes the default gate."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import onnx

    input_name = _input_name(source)
    # The classifier head (Gemm/MatMul) and Softmax stay float: quantized probabilities step by 1/255
    # and no longer sum to 1, and the head is a sliver of the work.
    graph = onnx.load(str(source), load_external_data=False).graph
    float_nodes = [node.name for node in graph.node if node.op_type in FLOAT_OPS]
    if len(calibration) > MAX_CALIBRATION_IMAGES:  # spread over every photo, not the first few
        calibration = calibration[np.linspace(0, len(calibration) - 1, MAX_CALIBRATION_IMAGES).astype(int)]
    batch = EVAL_BATCH

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterable[np.ndarray] = iter(_batches(calibration, batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)  # type: ignore[call-overload]
            return None if batch is None else {input_name: batch}

    prepared = target.with_name("model.prepared.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # the quantizer logs a line per adjusted weight channel
    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=float_nodes)
    except Exception as err:  # the quantizer raises anything from ValueError to onnx errors
        raise PrecisionRefused(f"ONNX Runtime's quantizer could not quantize the model: "
                               f"{type(err).__name__}: {err}") from err
    finally:
        root.setLevel(level)
        prepared.unlink(missing_ok=True)
    return {"method": "onnxruntime static, QDQ, per-channel int8 weights, uint8 activations, min-max; head and softmax in float",
            "calibration_images": int(len(calibration))}


def _input_name(path: Path) -> str:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].name


def _batches(images: np.ndarray, size: int = EVAL_BATCH) -> Iterable[np.ndarray]:
    for start in range(0, len(images), size):
        yield np.ascontiguousarray(images[start:start + size], dtype=np.float32)


def fp32_session(path: Path, threads: int = 0) -> Any:
    """The fp32 reference: ONNX Runtime on the fp32 file, as the fp32 tier is served."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_probabilities(session: Any, images: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(["probabilities"], {name: batch})[0] for batch in _batches(images)])


def openvino_probabilities(compiled: Any, images: np.ndarray) -> np.ndarray:
    request = compiled.create_infer_request()
    output = compiled.output("probabilities")
    return np.concatenate([np.array(request.infer({0: batch})[output], copy=True) for batch in _batches(images)])


def zero_shot_tier(onnx_path: Path, precision: str, manifest: dict[str, Any], gate: Gate = Gate(),
                   threads: int = 0) -> BuiltTier:
    """A zero-shot export's tier: calibrated on the shipped photos, gated on the other (held-out) photos."""
    from headswap.export.calibration_images import photo_sets
    from headswap.inference.images import Preprocessing

    if check_precision(precision) == "fp32":
        return make_tier(onnx_path, precision, np.empty((0,)), np.empty((0,)), gate=gate, threads=threads)
    pre = Preprocessing.from_manifest(manifest)
    calibration, heldout = photo_sets(pre.height, pre.width)
    built = make_tier(onnx_path, precision, pre.normalize(calibration.pixels), pre.normalize(heldout.pixels),
                      gate=gate, threads=threads)
    fields = built.fields
    fields["accuracy"].update(against="fp32 (onnxruntime) on held-out photos shipped with scikit-image/scikit-learn",
                              heldout_photos=sorted(set(heldout.sources)))
    for calibrated in ("quantization", "recheck"):
        if calibrated in fields:
            fields[calibrated]["calibration_photos"] = sorted(set(calibration.sources))
    return built
