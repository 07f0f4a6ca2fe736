"""An embedded model zoo: small, realistic ONNX models built offline and deterministically.

The models are written directly with :mod:`onnx.helper` and random weights from
``numpy.random.default_rng(seed)``, so tests, notebooks and benchmarks need neither a model hub
nor PyTorch. The same seed always gives byte-identical ``SerializeToString()`` output.

Three architectures are available (see :data:`MODEL_NAMES`):

``mobilenetv2``
    MobileNetV2 (width 1.0, 224x224): stem, 17 inverted-residual blocks, 1x1 head conv,
    global pooling, classifier. Depthwise convolutions and inverted residuals make the cut
    sizes vary a lot from block to block, which is what a splitter needs to show.
``resnet``
    A ResNet-18-style network with basic blocks and 1x1 projection shortcuts.
``encoder``
    A small BERT-like post-LN transformer encoder (``input_ids`` + ``attention_mask`` in,
    ``last_hidden_state`` out). The extended attention mask is computed once near the start
    and consumed by every layer, so it crosses every cut, as in exported Hugging Face models.

Every node has a unique hierarchical name whose first ``/``-separated component names the
layer it belongs to (``stem``, ``block3``, ``head``, ``classifier``, ``embeddings``, ``mask``,
``layer0``, ...). Node outputs are named ``<node name>:<index>``; initializers are named
``<module>.<role>`` (for example ``block3/expand/conv.weight`` or ``block3/expand/bn.running_var``).
Each initializer is used by exactly one node, so any sub-graph extracted between two cuts is
self-contained.

Weights use He (convolutions) or Xavier (dense layers) scaling; BatchNormalization nodes are kept
(not folded) with near-identity statistics, so activations stay O(1) through the whole network.

This module imports :mod:`onnx`; it is not on the device path.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeoffload.errors import UsageError

__all__ = [
    "DEFAULT_MODEL",
    "IR_VERSION",
    "MODEL_NAMES",
    "OPSET",
    "build",
    "build_encoder",
    "build_mobilenetv2",
    "build_resnet",
    "save",
]

MODEL_NAMES: tuple[str, ...] = ("mobilenetv2", "resnet", "encoder")
"""Names accepted by :func:`build` and :func:`save`."""

DEFAULT_MODEL = "mobilenetv2"
"""The model used when a caller does not name one."""

OPSET = 17
"""Default-domain opset of every zoo model."""

IR_VERSION = 8
"""ONNX IR version of every zoo model (the lowest one opset 17 allows; every onnxruntime >= 1.14
loads it)."""

PRODUCER_NAME = "edgeoffload.zoo"

# (expansion t, output channels c, repeats n, first stride s) from the MobileNetV2 paper.
_MOBILENETV2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

_BN_EPSILON = 1e-5
_LN_EPSILON = 1e-12


class _GraphBuilder:
    """Collects nodes and initializers, enforces unique names, and draws seeded weights."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._node_names: set[str] = set()
        self._tensor_names: set[str] = set()

    # -- primitives --------------------------------------------------------------------------

    def const(self, name: str, array: np.ndarray) -> str:
        """Add an initializer called ``name`` holding ``array``; return its name."""
        if name in self._tensor_names:
            raise RuntimeError(f"duplicate tensor name {name!r}")  # a bug in this module
        self._tensor_names.add(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(
        self,
        op_type: str,
        inputs: Sequence[str],
        name: str,
        *,
        outputs: Sequence[str] | None = None,
        **attrs: Any,
    ) -> str:
        """Add one node called ``name``; return the name of its first output.

        Outputs default to ``<name>:0``; pass ``outputs`` to name a graph output.
        """
        if name in self._node_names:
            raise RuntimeError(f"duplicate node name {name!r}")  # a bug in this module
        self._node_names.add(name)
        out_names = list(outputs) if outputs is not None else [f"{name}:0"]
        for out in out_names:
            if out in self._tensor_names:
                raise RuntimeError(f"duplicate tensor name {out!r}")
            self._tensor_names.add(out)
        self.nodes.append(helper.make_node(op_type, list(inputs), out_names, name=name, **attrs))
        return out_names[0]

    def scalar_f32(self, name: str, value: float) -> str:
        return self.const(name, np.array(value, dtype=np.float32))

    def normal(self, shape: Sequence[int], std: float) -> np.ndarray:
        """Seeded float32 draws from N(0, std^2)."""
        sample: np.ndarray = self.rng.standard_normal(tuple(shape), dtype=np.float32)
        sample *= np.float32(std)
        return sample

    # -- layers ------------------------------------------------------------------------------

    def conv(
        self,
        name: str,
        x: str,
        in_ch: int,
        out_ch: int,
        kernel: int,
        *,
        stride: int = 1,
        group: int = 1,
        gain: float = 2.0,
    ) -> str:
        """A bias-free square convolution node ``name`` with ``same``-style padding."""
        fan_in = (in_ch // group) * kernel * kernel
        weight = self.normal((out_ch, in_ch // group, kernel, kernel), math.sqrt(gain / fan_in))
        pad = kernel // 2
        return self.node(
            "Conv",
            [x, self.const(f"{name}.weight", weight)],
            name,
            kernel_shape=[kernel, kernel],
            strides=[stride, stride],
            pads=[pad, pad, pad, pad],
            group=group,
        )

    def batch_norm(self, name: str, x: str, channels: int) -> str:
        """Inference BatchNormalization node ``name`` with near-identity statistics."""
        gamma = (1.0 + self.normal((channels,), 0.05)).astype(np.float32)
        beta = self.normal((channels,), 0.05)
        mean = self.normal((channels,), 0.05)
        var = (1.0 + np.abs(self.normal((channels,), 0.1))).astype(np.float32)
        return self.node(
            "BatchNormalization",
            [
                x,
                self.const(f"{name}.weight", gamma),
                self.const(f"{name}.bias", beta),
                self.const(f"{name}.running_mean", mean),
                self.const(f"{name}.running_var", var),
            ],
            name,
            epsilon=_BN_EPSILON,
        )

    def relu6(self, name: str, x: str) -> str:
        """ReLU6 node ``name``: ``Clip`` with min/max initializer inputs (opset >= 11 form)."""
        return self.node(
            "Clip",
            [x, self.scalar_f32(f"{name}.min", 0.0), self.scalar_f32(f"{name}.max", 6.0)],
            name,
        )

    def linear(self, prefix: str, x: str, in_features: int, out_features: int) -> str:
        """``MatMul`` + ``Add`` with a Xavier-scaled ``[in, out]`` weight."""
        std = math.sqrt(2.0 / (in_features + out_features))
        weight = self.normal((in_features, out_features), std)
        bias = self.normal((out_features,), 0.02)
        y = self.node("MatMul", [x, self.const(f"{prefix}.weight", weight)], f"{prefix}/matmul")
        return self.node("Add", [y, self.const(f"{prefix}.bias", bias)], f"{prefix}/add")

    def layer_norm(self, name: str, x: str, features: int, *, output: str | None = None) -> str:
        """``LayerNormalization`` over the last axis with gamma ~ 1 and small beta."""
        gamma = (1.0 + self.normal((features,), 0.05)).astype(np.float32)
        beta = self.normal((features,), 0.02)
        return self.node(
            "LayerNormalization",
            [x, self.const(f"{name}.weight", gamma), self.const(f"{name}.bias", beta)],
            name,
            outputs=[output] if output is not None else None,
            axis=-1,
            epsilon=_LN_EPSILON,
        )

    def classifier(self, x: str, in_features: int, num_classes: int) -> str:
        """``classifier/gemm`` producing the ``logits`` graph output."""
        weight = self.normal((num_classes, in_features), math.sqrt(1.0 / in_features))
        bias = self.normal((num_classes,), 0.01)
        return self.node(
            "Gemm",
            [
                x,
                self.const("classifier/gemm.weight", weight),
                self.const("classifier/gemm.bias", bias),
            ],
            "classifier/gemm",
            outputs=["logits"],
            transB=1,
        )

    # -- model -------------------------------------------------------------------------------

    def model(
        self,
        graph_name: str,
        inputs: Sequence[onnx.ValueInfoProto],
        outputs: Sequence[onnx.ValueInfoProto],
        *,
        doc: str,
        metadata: dict[str, str],
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            graph_name,
            list(inputs),
            list(outputs),
            initializer=self.initializers,
            doc_string=doc,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name=PRODUCER_NAME,
            doc_string=doc,
        )
        model.ir_version = IR_VERSION
        helper.set_model_props(model, metadata)
        return model


# -- validation helpers ------------------------------------------------------------------------


def _require_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _require_seed(seed: object) -> int:
    return _require_int("seed", seed, minimum=0)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count like the MobileNet reference implementation does."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def _image_io(resolution: int, num_classes: int) -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    image = helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, ["batch", 3, resolution, resolution]
    )
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])
    return image, logits


# -- MobileNetV2 -------------------------------------------------------------------------------


def build_mobilenetv2(
    *,
    seed: int = 0,
    resolution: int = 224,
    width: float = 1.0,
    num_classes: int = 1000,
) -> onnx.ModelProto:
    """Build a MobileNetV2 classifier with random weights.

    Layout: ``stem`` (conv 3x3 s2 + BN + ReLU6) -> ``block0`` .. ``block16`` (inverted
    residuals: optional ``expand`` 1x1, ``dw`` depthwise 3x3, ``project`` 1x1, residual ``add``
    when the stride is 1 and the channel count is unchanged) -> ``head`` (conv 1x1 to 1280 + BN +
    ReLU6, ``pool``, ``flatten``) -> ``classifier/gemm``.

    Args:
        seed: seed for ``numpy.random.default_rng``.
        resolution: input height and width; a multiple of 32 keeps every stage exact.
        width: channel multiplier (1.0 is the reference network, 3.5M parameters).
        num_classes: size of the ``logits`` output.

    Returns:
        The model: input ``input`` float32 ``[batch, 3, resolution, resolution]``, output
        ``logits`` float32 ``[batch, num_classes]``.

    Raises:
        UsageError: an argument is out of range.
    """
    seed = _require_seed(seed)
    resolution = _require_int("resolution", resolution, minimum=32)
    num_classes = _require_int("num_classes", num_classes, minimum=1)
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 8:
        raise UsageError(f"width must be a number in (0, 8], got {width!r}")

    b = _GraphBuilder(seed)
    in_ch = _make_divisible(32 * width)
    last_ch = _make_divisible(1280 * max(1.0, width))

    x = b.conv("stem/conv", "input", 3, in_ch, 3, stride=2)
    x = b.batch_norm("stem/bn", x, in_ch)
    x = b.relu6("stem/relu6", x)

    index = 0
    for t, c, n, s in _MOBILENETV2_SETTINGS:
        out_ch = _make_divisible(c * width)
        for i in range(n):
            stride = s if i == 0 else 1
            name = f"block{index}"
            hidden = in_ch * t
            y = x
            if t != 1:
                y = b.conv(f"{name}/expand/conv", y, in_ch, hidden, 1)
                y = b.batch_norm(f"{name}/expand/bn", y, hidden)
                y = b.relu6(f"{name}/expand/relu6", y)
            y = b.conv(f"{name}/dw/conv", y, hidden, hidden, 3, stride=stride, group=hidden)
            y = b.batch_norm(f"{name}/dw/bn", y, hidden)
            y = b.relu6(f"{name}/dw/relu6", y)
            # Linear bottleneck: no activation follows the projection, so He gain 1.
            y = b.conv(f"{name}/project/conv", y, hidden, out_ch, 1, gain=1.0)
            y = b.batch_norm(f"{name}/project/bn", y, out_ch)
            if stride == 1 and in_ch == out_ch:
                y = b.node("Add", [x, y], f"{name}/add")
            x = y
            in_ch = out_ch
            index += 1

    x = b.conv("head/conv", x, in_ch, last_ch, 1)
    x = b.batch_norm("head/bn", x, last_ch)
    x = b.relu6("head/relu6", x)
    x = b.node("GlobalAveragePool", [x], "head/pool")
    x = b.node("Flatten", [x], "head/flatten", axis=1)
    b.classifier(x, last_ch, num_classes)

    image, logits = _image_io(resolution, num_classes)
    return b.model(
        "mobilenetv2",
        [image],
        [logits],
        doc=(
            f"MobileNetV2 (width {width}, {resolution}x{resolution}, {num_classes} classes), "
            f"random weights, seed {seed}; built by {PRODUCER_NAME}."
        ),
        metadata={
            "zoo.name": "mobilenetv2",
            "zoo.seed": str(seed),
            "zoo.resolution": str(resolution),
            "zoo.width": repr(float(width)),
            "zoo.num_classes": str(num_classes),
        },
    )


# -- ResNet ------------------------------------------------------------------------------------


def build_resnet(
    *,
    seed: int = 0,
    resolution: int = 224,
    widths: Sequence[int] = (32, 64, 128, 256),
    blocks: Sequence[int] = (2, 2, 2, 2),
    num_classes: int = 1000,
) -> onnx.ModelProto:
    """Build a ResNet-18-style classifier (basic blocks) with random weights.

    Layout: ``stem`` (conv 7x7 s2 + BN + Relu + ``maxpool`` 3x3 s2) -> ``block0`` ..
    ``block{N-1}`` numbered across all stages (``conv1``/``bn1``/``relu1``, ``conv2``/``bn2``,
    a ``downsample`` 1x1 conv + BN when the stride or the width changes, ``add``, ``relu``) ->
    ``head`` (``pool``, ``flatten``) -> ``classifier/gemm``. Every stage after the first starts
    with stride 2. The defaults give a half-width ResNet-18 (3.1M parameters).

    Args:
        seed: seed for ``numpy.random.default_rng``.
        resolution: input height and width (>= 32).
        widths: channel count of each stage.
        blocks: number of basic blocks in each stage (same length as ``widths``).
        num_classes: size of the ``logits`` output.

    Returns:
        The model: input ``input`` float32 ``[batch, 3, resolution, resolution]``, output
        ``logits`` float32 ``[batch, num_classes]``.

    Raises:
        UsageError: an argument is out of range.
    """
    seed = _require_seed(seed)
    resolution = _require_int("resolution", resolution, minimum=32)
    num_classes = _require_int("num_classes", num_classes, minimum=1)
    widths = tuple(widths)
    blocks = tuple(blocks)
    if not widths or len(widths) != len(blocks):
        raise UsageError(
            f"widths and blocks must be non-empty and of equal length, got {widths} and {blocks}"
        )
    for w in widths:
        _require_int("each width", w, minimum=1)
    for n in blocks:
        _require_int("each block count", n, minimum=1)

    b = _GraphBuilder(seed)
    x = b.conv("stem/conv", "input", 3, widths[0], 7, stride=2)
    x = b.batch_norm("stem/bn", x, widths[0])
    x = b.node("Relu", [x], "stem/relu")
    x = b.node(
        "MaxPool",
        [x],
        "stem/maxpool",
        kernel_shape=[3, 3],
        strides=[2, 2],
        pads=[1, 1, 1, 1],
    )

    in_ch = widths[0]
    # Damping the last conv of each residual branch keeps the variance of the residual stream
    # bounded (with plain He scaling it would double with every block).
    branch_gain = 2.0 / sum(blocks)
    index = 0
    for stage, (out_ch, n) in enumerate(zip(widths, blocks, strict=True)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            name = f"block{index}"
            y = b.conv(f"{name}/conv1", x, in_ch, out_ch, 3, stride=stride)
            y = b.batch_norm(f"{name}/bn1", y, out_ch)
            y = b.node("Relu", [y], f"{name}/relu1")
            y = b.conv(f"{name}/conv2", y, out_ch, out_ch, 3, gain=branch_gain)
            y = b.batch_norm(f"{name}/bn2", y, out_ch)
            shortcut = x
            if stride != 1 or in_ch != out_ch:
                shortcut = b.conv(
                    f"{name}/downsample/conv", x, in_ch, out_ch, 1, stride=stride, gain=1.0
                )
                shortcut = b.batch_norm(f"{name}/downsample/bn", shortcut, out_ch)
            y = b.node("Add", [shortcut, y], f"{name}/add")
            x = b.node("Relu", [y], f"{name}/relu")
            in_ch = out_ch
            index += 1

    x = b.node("GlobalAveragePool", [x], "head/pool")
    x = b.node("Flatten", [x], "head/flatten", axis=1)
    b.classifier(x, in_ch, num_classes)

    image, logits = _image_io(resolution, num_classes)
    return b.model(
        "resnet",
        [image],
        [logits],
        doc=(
            f"ResNet (basic blocks, widths {list(widths)}, blocks {list(blocks)}, "
            f"{resolution}x{resolution}, {num_classes} classes), random weights, seed {seed}; "
            f"built by {PRODUCER_NAME}."
        ),
        metadata={
            "zoo.name": "resnet",
            "zoo.seed": str(seed),
            "zoo.resolution": str(resolution),
            "zoo.widths": ",".join(map(str, widths)),
            "zoo.blocks": ",".join(map(str, blocks)),
            "zoo.num_classes": str(num_classes),
        },
    )


# -- Transformer encoder -----------------------------------------------------------------------


def build_encoder(
    *,
    seed: int = 0,
    vocab_size: int = 1000,
    max_positions: int = 512,
    hidden: int = 256,
    heads: int = 4,
    layers: int = 4,
    ffn: int = 1024,
) -> onnx.ModelProto:
    """Build a small BERT-like (post-LN) transformer encoder with random weights.

    Layout: ``embeddings`` (``word`` Gather + the first ``sequence`` rows of the ``position``
    table, ``add``, ``ln``) and ``mask`` (the extended attention mask ``(1 - mask) * -10000`` shaped
    ``[batch, 1, 1, sequence]``, computed once) -> ``layer0`` .. ``layer{N-1}`` (``attention``
    with ``q``/``k``/``v`` projections, ``scores``, ``softmax``, ``context``, ``output``,
    ``residual``, ``ln``; then ``ffn`` with ``in``, ``gelu`` written with ``Erf``, ``out``,
    ``residual``, ``ln``). The sequence length stays symbolic: positions come from ``Shape``.

    Args:
        seed: seed for ``numpy.random.default_rng``.
        vocab_size: rows of the word embedding; ``input_ids`` must be in ``[0, vocab_size)``.
        max_positions: rows of the position embedding (the longest sequence accepted).
        hidden: model width; must be divisible by ``heads``.
        heads: attention heads.
        layers: encoder layers.
        ffn: width of the feed-forward layer.

    Returns:
        The model: inputs ``input_ids`` and ``attention_mask`` int64 ``[batch, sequence]``
        (mask 1 = attend, 0 = padding), output ``last_hidden_state`` float32
        ``[batch, sequence, hidden]``.

    Raises:
        UsageError: an argument is out of range.
    """
    seed = _require_seed(seed)
    vocab_size = _require_int("vocab_size", vocab_size, minimum=1)
    max_positions = _require_int("max_positions", max_positions, minimum=1)
    hidden = _require_int("hidden", hidden, minimum=1)
    heads = _require_int("heads", heads, minimum=1)
    layers = _require_int("layers", layers, minimum=1)
    ffn = _require_int("ffn", ffn, minimum=1)
    if hidden % heads:
        raise UsageError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    head_dim = hidden // heads
    i64 = np.int64

    b = _GraphBuilder(seed)

    # Embeddings. Unit-variance tables; the LayerNorm right after fixes the scale anyway.
    word = b.const("embeddings/word.weight", b.normal((vocab_size, hidden), 1.0))
    x = b.node("Gather", [word, "input_ids"], "embeddings/word", axis=0)
    # Positions are a prefix of the position table, sliced to the (symbolic) sequence length.
    # Not Gather(table, Range(0, seq)): onnxruntime 1.32's extended optimizations rewrite that
    # into a Slice with 0-d starts and then fail at run time.
    seq_len = b.node("Shape", ["input_ids"], "embeddings/position/shape", start=1, end=2)
    pos_table = b.const("embeddings/position.weight", b.normal((max_positions, hidden), 1.0))
    pos = b.node(
        "Slice",
        [
            pos_table,
            b.const("embeddings/position/slice.starts", np.array([0], dtype=i64)),
            seq_len,
            b.const("embeddings/position/slice.axes", np.array([0], dtype=i64)),
        ],
        "embeddings/position/slice",
    )
    x = b.node("Add", [x, pos], "embeddings/add")
    x = b.layer_norm("embeddings/ln", x, hidden)

    # Extended attention mask, computed once and shared by every layer.
    mask = b.node("Cast", ["attention_mask"], "mask/cast", to=TensorProto.FLOAT)
    mask = b.node(
        "Unsqueeze",
        [mask, b.const("mask/unsqueeze.axes", np.array([1, 2], dtype=i64))],
        "mask/unsqueeze",
    )
    mask = b.node("Sub", [b.scalar_f32("mask/sub.one", 1.0), mask], "mask/sub")
    mask = b.node("Mul", [mask, b.scalar_f32("mask/mul.min", -10000.0)], "mask/mul")

    split_shape = np.array([0, -1, heads, head_dim], dtype=i64)
    merge_shape = np.array([0, -1, hidden], dtype=i64)
    for layer in range(layers):
        att = f"layer{layer}/attention"

        def heads_of(kind: str, perm: list[int], h: str, att: str = att) -> str:
            y = b.linear(f"{att}/{kind}", h, hidden, hidden)
            y = b.node(
                "Reshape",
                [y, b.const(f"{att}/{kind}/reshape.shape", split_shape)],
                f"{att}/{kind}/reshape",
            )
            return b.node("Transpose", [y], f"{att}/{kind}/transpose", perm=perm)

        q = heads_of("q", [0, 2, 1, 3], x)  # [batch, heads, seq, head_dim]
        k = heads_of("k", [0, 2, 3, 1], x)  # [batch, heads, head_dim, seq]
        v = heads_of("v", [0, 2, 1, 3], x)  # [batch, heads, seq, head_dim]
        scores = b.node("MatMul", [q, k], f"{att}/scores/matmul")
        scores = b.node(
            "Mul",
            [scores, b.scalar_f32(f"{att}/scores/scale.value", 1.0 / math.sqrt(head_dim))],
            f"{att}/scores/scale",
        )
        scores = b.node("Add", [scores, mask], f"{att}/scores/mask")
        probs = b.node("Softmax", [scores], f"{att}/softmax", axis=-1)
        ctx = b.node("MatMul", [probs, v], f"{att}/context/matmul")
        ctx = b.node("Transpose", [ctx], f"{att}/context/transpose", perm=[0, 2, 1, 3])
        ctx = b.node(
            "Reshape",
            [ctx, b.const(f"{att}/context/reshape.shape", merge_shape)],
            f"{att}/context/reshape",
        )
        y = b.linear(f"{att}/output", ctx, hidden, hidden)
        y = b.node("Add", [x, y], f"{att}/residual")
        x = b.layer_norm(f"{att}/ln", y, hidden)

        ff = f"layer{layer}/ffn"
        y = b.linear(f"{ff}/in", x, hidden, ffn)
        y = _gelu(b, f"{ff}/gelu", y)
        y = b.linear(f"{ff}/out", y, ffn, hidden)
        y = b.node("Add", [x, y], f"{ff}/residual")
        last = layer == layers - 1
        x = b.layer_norm(f"{ff}/ln", y, hidden, output="last_hidden_state" if last else None)

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
    ]
    output = helper.make_tensor_value_info(
        "last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden]
    )
    return b.model(
        "encoder",
        inputs,
        [output],
        doc=(
            f"BERT-like encoder (vocab {vocab_size}, hidden {hidden}, heads {heads}, "
            f"layers {layers}, ffn {ffn}, max positions {max_positions}), random weights, "
            f"seed {seed}; built by {PRODUCER_NAME}."
        ),
        metadata={
            "zoo.name": "encoder",
            "zoo.seed": str(seed),
            "zoo.vocab_size": str(vocab_size),
            "zoo.max_positions": str(max_positions),
            "zoo.hidden": str(hidden),
            "zoo.heads": str(heads),
            "zoo.layers": str(layers),
            "zoo.ffn": str(ffn),
        },
    )


def _gelu(b: _GraphBuilder, name: str, x: str) -> str:
    """Exact GELU, ``x * 0.5 * (1 + erf(x / sqrt(2)))``, as the BERT exporters write it."""
    y = b.node("Div", [x, b.scalar_f32(f"{name}/div.sqrt2", math.sqrt(2.0))], f"{name}/div")
    y = b.node("Erf", [y], f"{name}/erf")
    y = b.node("Add", [y, b.scalar_f32(f"{name}/add.one", 1.0)], f"{name}/add")
    y = b.node("Mul", [x, y], f"{name}/mul")
    return b.node("Mul", [y, b.scalar_f32(f"{name}/half.value", 0.5)], f"{name}/half")


# -- entry points ------------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[..., onnx.ModelProto]] = {
    "mobilenetv2": build_mobilenetv2,
    "resnet": build_resnet,
    "encoder": build_encoder,
}


def build(name: str, *, seed: int = 0) -> onnx.ModelProto:
    """Build zoo model ``name`` with its default configuration.

    Args:
        name: one of :data:`MODEL_NAMES`.
        seed: seed for the random weights; the same seed gives byte-identical models.

    Raises:
        UsageError: ``name`` is not a zoo model, or ``seed`` is not a non-negative integer.
    """
    builder = _BUILDERS.get(name) if isinstance(name, str) else None
    if builder is None:
        raise UsageError(
            f"unknown zoo model {name!r}; valid names: {', '.join(MODEL_NAMES)}",
            hint=f"pass one of {', '.join(MODEL_NAMES)} (default {DEFAULT_MODEL})",
        )
    return builder(seed=seed)


def save(name: str, path: str | os.PathLike[str], *, seed: int = 0) -> pathlib.Path:
    """Build zoo model ``name`` and write it to ``path``.

    Args:
        name: one of :data:`MODEL_NAMES`.
        path: the file to write; if it is an existing directory, ``<name>.onnx`` inside it.
            Missing parent directories are created.
        seed: seed for the random weights.

    Returns:
        The path of the file written.

    Raises:
        UsageError: ``name`` is not a zoo model.
    """
    model = build(name, seed=seed)
    target = pathlib.Path(path)
    if target.is_dir():
        target = target / f"{name}.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(model.SerializeToString())
    return target
