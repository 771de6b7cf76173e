"""Full float32 matrix products for the reference predictions that parity checks compare against.

On NVIDIA GPUs since Ampere, TensorFlow and JAX run float32 matrix products and convolutions in
TensorFloat-32 by default (a 10-bit mantissa). That alone moves a softmax head's probabilities by
about 1e-4, the parity tolerance: on an H200 a head-only fine-tune under JAX was refused with a
difference of 1.03e-4 between the Keras head and its ONNX composition, which ONNX Runtime runs
in full float32 on the CPU. Training keeps the fast default; only the predictions that an ONNX
file is checked against, and scored on, run in full float32.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack, contextmanager
from typing import Iterator


@contextmanager
def exact_float32() -> Iterator[None]:
    """Within the block, JAX and TensorFlow (whichever this process has imported) multiply in full
    float32. On a CPU it changes nothing: both already do."""
    with ExitStack() as stack:
        if "jax" in sys.modules:
            import jax

            stack.enter_context(jax.default_matmul_precision("float32"))
        if "tensorflow" in sys.modules:
            import tensorflow as tf

            was_enabled = tf.config.experimental.tensor_float_32_execution_enabled()
            tf.config.experimental.enable_tensor_float_32_execution(False)
            stack.callback(tf.config.experimental.enable_tensor_float_32_execution, was_enabled)
        yield
