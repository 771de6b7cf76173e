"""Head-only fine-tunes without re-conversion: append the trained head to the base's ONNX graph.

The base version's ONNX file is already converted, parity-checked and served; its `embedding`
output is exactly what the head was trained on. So the new version is that graph, cut after
`embedding` (the ImageNet classifier dropped), with the head appended as plain ONNX nodes:

    embedding -> [MatMul + Add + Relu  (hidden_units > 0)] -> MatMul + Add -> Softmax -> probabilities
    embedding (or the logits) -> the fitted out-of-distribution score -> ood_score   (`ood.score_nodes`)

Dropout is the identity at inference and is left out. Only the `onnx` package and numpy are
used here: no tf2onnx, no TensorFlow, whatever the Keras backend. Parity is measured on the
published file itself: its embedding -> probabilities part is run by ONNX Runtime on the cached
validation embeddings and compared with the Keras head's own predictions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from headswap.errors import FailedPrecondition
from headswap.inference.ood import OOD_OUTPUT
from headswap.training import ood as ood_scores

INPUT_NAME = "image"
EMBEDDING = "embedding"
PROBABILITIES = "probabilities"
PARITY_TOLERANCE = 1e-4
PREFIX = "headswap_head"


class CompositionError(FailedPrecondition):
    """The base graph cannot take a head, or the composed graph disagrees with Keras."""


@dataclass(frozen=True)
class DenseWeights:
    """One Dense layer as numpy arrays: kernel [in, out], bias [out], and its activation."""

    kernel: np.ndarray
    bias: np.ndarray
    activation: str  # "relu", "softmax" or "linear"


def dense_layers_of(head: object) -> list[DenseWeights]:
    """The Dense layers of a Keras head, in order (Dropout and Input layers are skipped).

    Uses only `layer.get_weights()` and the layer config, so any Keras backend works.
    """
    import keras

    dense = []
    for layer in head.layers:  # type: ignore[attr-defined]
        if isinstance(layer, keras.layers.Dense):
            kernel, bias = layer.get_weights()
            # The function's name, not keras.activations.serialize: that imports TensorFlow.
            name = getattr(layer.activation, "__name__", str(layer.activation))
            dense.append(DenseWeights(np.asarray(kernel, np.float32), np.asarray(bias, np.float32), name))
        elif not isinstance(layer, (keras.layers.Dropout, keras.layers.InputLayer)):
            raise CompositionError(f"the head has a {type(layer).__name__} layer; only Dense and Dropout compose")
    check_layers(dense)
    return dense


def check_layers(layers: list[DenseWeights]) -> None:
    """A head that composes: Dense layers that chain, hidden ones relu/linear, the last softmax."""
    if not layers or layers[-1].activation != "softmax":
        raise CompositionError("the head must end in a softmax Dense layer")
    if any(d.activation not in ("relu", "linear") for d in layers[:-1]):
        raise CompositionError("hidden Dense layers must use relu or no activation")
    for before, after in zip(layers, layers[1:]):
        if before.kernel.shape[1] != after.kernel.shape[0]:
            raise CompositionError(f"Dense layers do not chain: {before.kernel.shape} then {after.kernel.shape}")


def head_nodes(layers: list[DenseWeights], embedding: str = EMBEDDING,
               output: str = PROBABILITIES) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """ONNX nodes and initializers computing `output` from `embedding` through the Dense layers."""
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    current = embedding
    for i, layer in enumerate(layers):
        kernel, bias = f"{PREFIX}/dense{i}/kernel", f"{PREFIX}/dense{i}/bias"
        initializers += [numpy_helper.from_array(layer.kernel, kernel), numpy_helper.from_array(layer.bias, bias)]
        matmul, added = f"{PREFIX}/dense{i}/matmul", f"{PREFIX}/dense{i}/add"
        nodes.append(helper.make_node("MatMul", [current, kernel], [matmul], name=matmul))
        nodes.append(helper.make_node("Add", [matmul, bias], [added], name=added))
        current = added
        if layer.activation == "relu":
            relu = f"{PREFIX}/dense{i}/relu"
            nodes.append(helper.make_node("Relu", [current], [relu], name=relu))
            current = relu
        elif layer.activation == "softmax":
            target = output if i == len(layers) - 1 else f"{PREFIX}/dense{i}/softmax"
            nodes.append(helper.make_node("Softmax", [current], [target], name=f"{PREFIX}/softmax", axis=-1))
            current = target
    return nodes, initializers


def logits_name(layers: list[DenseWeights]) -> str:
    """The last Dense layer's pre-softmax output in the composed graph."""
    return f"{PREFIX}/dense{len(layers) - 1}/add"


def compose(base_path: Path, layers: list[DenseWeights], output_path: Path,
            ood: ood_scores.OodScore | None = None) -> dict[str, int]:
    """Write base graph (up to `embedding`) + head as one ONNX file; returns its shape facts.

    Outputs stay `probabilities` then `embedding` (servers read the probabilities by the name the
    manifest gives), then `ood_score` [N] when an out-of-distribution score is given, with the
    same dynamic batch dimension as the base.
    """
    check_layers(layers)
    base = onnx.load(str(base_path))
    outputs = [value.name for value in base.graph.output]
    if EMBEDDING not in outputs or [value.name for value in base.graph.input] != [INPUT_NAME]:
        raise CompositionError(f"the base graph has inputs {[v.name for v in base.graph.input]} and outputs "
                               f"{outputs}; a head needs input {INPUT_NAME!r} and output {EMBEDDING!r}")
    embedding_value = next(v for v in base.graph.output if v.name == EMBEDDING)
    dims = embedding_value.type.tensor_type.shape.dim
    embedding_size = dims[1].dim_value if len(dims) == 2 else 0
    if embedding_size and embedding_size != layers[0].kernel.shape[0]:
        raise CompositionError(f"the head takes {layers[0].kernel.shape[0]} features; the base's embedding has "
                               f"{embedding_size}")
    graph = base.graph
    prune_to(graph, EMBEDDING)  # the ImageNet classifier (and its weights) go
    nodes, initializers = head_nodes(layers)
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    num_classes = int(layers[-1].bias.shape[0])
    probabilities = helper.make_tensor_value_info(PROBABILITIES, onnx.TensorProto.FLOAT, ["batch", num_classes])
    graph.output.insert(0, probabilities)
    if ood is not None:
        opset = max((o.version for o in base.opset_import if o.domain in ("", "ai.onnx")), default=13)
        nodes, initializers = ood_scores.score_nodes(ood, EMBEDDING, logits_name(layers), PROBABILITIES, opset)
        graph.node.extend(nodes)
        graph.initializer.extend(initializers)
        graph.output.append(helper.make_tensor_value_info(OOD_OUTPUT, onnx.TensorProto.FLOAT, ["batch"]))
    base.producer_name = "headswap"
    base.doc_string = "base ONNX graph + fine-tuned head composed by headswap (no re-conversion)"
    try:
        onnx.checker.check_model(base)
    except onnx.checker.ValidationError as err:
        raise CompositionError(f"the composed ONNX graph is invalid: {err}") from err
    onnx.save(base, str(output_path))
    return {"num_classes": num_classes, "embedding_size": int(layers[0].kernel.shape[0])}


def prune_to(graph: onnx.GraphProto, output: str) -> None:
    """Keep only the nodes and initializers that `output` depends on; it becomes the only output.

    A reverse walk over the (topologically sorted) node list: cheaper than onnx.utils.Extractor,
    which runs shape inference over the whole backbone first.
    """
    needed = {output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
            for attribute in node.attribute:  # subgraphs (If/Loop) read outer names too
                for sub in list(attribute.g.node if attribute.HasField("g") else []):
                    needed.update(sub.input)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    value_info = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(value_info)
    outputs = [v for v in graph.output if v.name == output]
    del graph.output[:]
    graph.output.extend(outputs)


def head_only(model: onnx.ModelProto, output: str = PROBABILITIES) -> onnx.ModelProto:
    """The embedding -> `output` part of a composed model (the probabilities, or the
    out-of-distribution score), as a model of its own."""
    head = onnx.ModelProto()
    head.CopyFrom(model)
    graph = head.graph
    kernel = next(t for t in graph.initializer if t.name == f"{PREFIX}/dense0/kernel")
    size = int(kernel.dims[0])
    prune_to(graph, output)
    start = [n for n in graph.node if n.name.startswith((PREFIX, ood_scores.PREFIX)) or output in n.output]
    names = {t for n in start for t in n.input}
    del graph.node[:]
    graph.node.extend(start)
    initializers = [t for t in graph.initializer if t.name in names]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    del graph.value_info[:]
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(EMBEDDING, onnx.TensorProto.FLOAT, ["batch", size]))
    return head


def check_parity(model_path: Path, embeddings: np.ndarray, expected: np.ndarray,
                 tolerance: float = PARITY_TOLERANCE) -> dict[str, float | int]:
    """Max abs difference of probabilities: the published file's head part in ONNX Runtime against
    the Keras head, on the same (cached validation) embeddings. Refuses above `tolerance`."""
    import onnxruntime as ort

    head = head_only(onnx.load(str(model_path)))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(head.SerializeToString(), options, providers=["CPUExecutionProvider"])
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if not len(embeddings):
        raise CompositionError("no validation embeddings to check the composed head on")
    got = session.run([PROBABILITIES], {EMBEDDING: embeddings})[0]
    if got.shape != expected.shape:
        raise CompositionError(f"composed head gives shape {got.shape}, the Keras head {expected.shape}")
    diff = float(np.max(np.abs(got - expected)))
    if not np.isfinite(diff) or diff > tolerance:
        raise CompositionError(f"the composed ONNX head and the Keras head disagree: max abs difference of "
                               f"probabilities {diff:.3g} over {len(embeddings)} validation embeddings "
                               f"(tolerance {tolerance:g}); not publishing")
    return {"max_abs_diff": diff, "samples": int(len(embeddings))}


def check_ood_parity(model_path: Path, embeddings: np.ndarray, expected: np.ndarray) -> float:
    """Relative max difference of the graph's `ood_score` against the numpy score on the same
    embeddings; refuses a graph whose score is not the one that was fitted and thresholded."""
    import onnxruntime as ort

    session = ort.InferenceSession(head_only(onnx.load(str(model_path)), OOD_OUTPUT).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    got = session.run([OOD_OUTPUT], {EMBEDDING: np.ascontiguousarray(embeddings, dtype=np.float32)})[0]
    scale = max(float(np.max(np.abs(expected))), 1e-6) if len(expected) else 1.0
    diff = float(np.max(np.abs(got - expected))) / scale if len(expected) else 0.0
    if got.shape != expected.shape or not np.isfinite(diff) or diff > 1e-3:
        raise CompositionError(f"the composed graph's {OOD_OUTPUT} disagrees with the fitted score (relative "
                               f"difference {diff:.3g}); not publishing")
    return diff
