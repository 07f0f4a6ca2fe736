"""Weight-only quantisation of a split's parts: int4 / int8 (MatMulNBits), fp16, or fp32 as cut.

A part is quantised *after* the cut, by onnxruntime's ``matmul_nbits_quantizer``: RTN (round to
nearest) or, for int4, HQQ, block-wise along the input dimension K of each ``MatMul`` weight;
int4 also packs the token embedding ``Gather`` into ``GatherBlockQuantized`` (RTN). The
quantiser works node by node and each weight's blocks depend on that weight's values and the
settings only, so quantising head and tail separately gives exactly the tensors that quantising
the whole model (each node with its side's settings, :func:`quantize_unsplit`) gives: the split
stays exact; ``tests/test_weights.py`` checks tokens and logits against that whole model.

The stock quantiser skips a ``MatMul`` whose weight is a ``Transpose`` of an initializer (the
tied ``lm_head`` of Llama-style exports reads the embedding through one). Before quantising we
*materialise* such views (:func:`materialise_weight_views`): the transposed array becomes an
initializer under the Transpose's output name and the Transpose goes, so the lm_head is
quantised too. In a tail this costs nothing: the embedding itself lives in the head.

fp16 stores every float initializer as float16, read through one ``Cast`` back to float32, so
the graph still computes in fp32 (we do not rely on fp16 kernels in onnxruntime's CPU provider)
and the KV cache and crossing tensors stay fp32. onnxruntime folds those casts when it
optimises a session, so fp16 halves the *file* (download, storage), not the memory of a running
part.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgeoffload.errors import MissingExtra, UsageError
from edgeoffload.split.graph import WEIGHT_VIEW_OPS, ModelGraph
from edgeoffload.types import CutPoint

WEIGHT_KINDS = ("fp32", "fp16", "int8", "int4")
BLOCK_SIZES = (32, 64, 128)
WEIGHT_METHODS = ("rtn", "hqq")
# MatMulNBits accuracy_level per compute type (0: unset, the kernel's fp32 path).
COMPUTE_TYPES = {"fp32": 0, "int8": 4}
# Block 32: the finest MatMulNBits block; it divides the hidden sizes of small LLMs (576 for
# SmolLM2, which 128 does not), and quality grows as blocks shrink at a cost of one fp32 scale
# (and a 4-bit zero point) per 32 weights, i.e. ~1.1 extra bits per weight for int4.
DEFAULT_BLOCK = 32
# Asymmetric (a zero point per block): each block's range need not be centred on zero, which
# int4 with 16 levels feels most (measured on SmolLM2: see README, "Quantised weights").
DEFAULT_SYMMETRIC = False
FLOAT_TYPES = (onnx.TensorProto.FLOAT,)


@dataclass(frozen=True)
class WeightScheme:
    """How a part's weights are stored: ``kind`` fp32 (as cut), fp16, int8 or int4; for the
    integer kinds the block size along K and whether the blocks are symmetric (no zero
    point)."""

    kind: str = "fp32"
    block: int = DEFAULT_BLOCK
    symmetric: bool = DEFAULT_SYMMETRIC
    method: str = "rtn"  # rtn (round to nearest) or hqq (half-quadratic, int4 MatMuls)
    # What MatMulNBits computes in: fp32 (dequantised weights, the numerics measured by the
    # quality report with this default) or int8 (onnxruntime's accuracy_level 4: activations
    # quantised to int8 per block on the fly; ~2x faster decode on x86, other numerics).
    compute: str = "fp32"

    def __post_init__(self) -> None:
        if self.method not in WEIGHT_METHODS:
            raise UsageError(
                f"--weights-method {self.method!r}: expected one of {', '.join(WEIGHT_METHODS)}"
            )
        if self.compute not in COMPUTE_TYPES:
            raise UsageError(
                f"--weights-compute {self.compute!r}: expected one of {', '.join(COMPUTE_TYPES)}"
            )
        if self.method == "hqq" and (self.kind != "int4" or self.symmetric):
            raise UsageError(
                "--weights-method hqq is for asymmetric int4 weights",
                hint="HQQ fits a scale and a float zero point per block; use rtn for the rest",
            )
        if self.kind not in WEIGHT_KINDS:
            raise UsageError(
                f"weights {self.kind!r}: expected one of {', '.join(WEIGHT_KINDS)}",
                hint="--head-weights / --tail-weights int4|int8|fp16|fp32",
            )
        if self.block not in BLOCK_SIZES:
            raise UsageError(
                f"--weights-block {self.block}: expected one of {', '.join(map(str, BLOCK_SIZES))}"
            )

    @property
    def bits(self) -> int:
        return {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}[self.kind]

    @property
    def quantised(self) -> bool:
        """Integer weights (block-wise, MatMulNBits)."""
        return self.kind in ("int8", "int4")

    def describe(self) -> str:
        if not self.quantised:
            return self.kind
        sym = "sym" if self.symmetric else "asym"
        return f"{self.kind} {self.method.upper()} block {self.block} {sym}"


def quantiser_version() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__} quantization.matmul_nbits_quantizer"


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def materialise_weight_views(model: onnx.ModelProto, exclude: Set[str] = frozenset()) -> int:
    """Replace ``Transpose(initializer)`` read only by ``MatMul`` weights with the transposed
    initializer, under the Transpose's output name (in place); returns how many. Nodes named
    in ``exclude`` keep their views. Other readers of the source initializer keep it (in a
    whole model, the embedding Gather)."""
    inits = _initializers(model)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    keep: list[onnx.NodeProto] = []
    done = 0
    for node in model.graph.node:
        users = readers.get(node.output[0], []) if node.output else []
        if (
            node.op_type == "Transpose"
            and node.domain in ("", "ai.onnx")
            and node.name not in exclude
            and node.input[0] in inits
            and users
            and all(u.op_type == "MatMul" and u.name not in exclude for u in users)
            and all(list(u.input[1:2]) == [node.output[0]] for u in users)
        ):
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            array = numpy_helper.to_array(inits[node.input[0]])
            transposed = np.ascontiguousarray(np.transpose(array, perm))
            model.graph.initializer.append(numpy_helper.from_array(transposed, node.output[0]))
            done += 1
            continue
        keep.append(node)
    if done:
        del model.graph.node[:]
        model.graph.node.extend(keep)
        _drop_unused_initializers(model)
    return done


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def quantize_model(
    model: onnx.ModelProto,
    scheme: WeightScheme,
    *,
    exclude_nodes: Iterable[str] = (),
) -> onnx.ModelProto:
    """A copy of ``model`` with its weights stored as ``scheme`` says (fp32: the model itself).

    ``exclude_nodes`` keeps those nodes as they are (used to build the whole-model reference
    of a split whose sides use different schemes, :func:`quantize_unsplit`).
    """
    if scheme.kind == "fp32":
        return model
    exclude = set(exclude_nodes)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if scheme.kind == "fp16":
        return _to_fp16_storage(out, exclude)
    materialise_weight_views(out, exclude)
    from onnxruntime.quantization.matmul_nbits_quantizer import (  # the split extra
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
    )

    before = {n.name for n in out.graph.node if n.op_type == "MatMulNBits"}
    # The stock quantiser packs Gather (embeddings) at 4 bits only; int8 leaves them fp32.
    ops = ("MatMul", "Gather") if scheme.kind == "int4" else ("MatMul",)
    if scheme.method == "hqq":
        _require_torch()
        hqq = HQQWeightOnlyQuantConfig(
            block_size=scheme.block, bits=scheme.bits, op_types_to_quantize=("MatMul",)
        )
        out = _run_quantiser(out, hqq, exclude)
        ops = ("Gather",)  # HQQ does not do Gather: the embedding gets RTN, as with rtn
    config = DefaultWeightOnlyQuantConfig(
        block_size=scheme.block,
        is_symmetric=scheme.symmetric,
        bits=scheme.bits,
        op_types_to_quantize=ops,
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    out = _run_quantiser(out, config, exclude)
    level = COMPUTE_TYPES[scheme.compute]
    if level:  # only on this call's nodes: a whole-model reference runs one call per side
        for node in out.graph.node:
            if node.op_type == "MatMulNBits" and node.name not in before:
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
    return out


def _require_torch() -> None:
    try:
        import torch  # noqa: F401  (HQQ's solver runs in torch)
    except ImportError:
        raise MissingExtra("torch", "convert", what="--weights-method hqq") from None


def _run_quantiser(model: onnx.ModelProto, config: Any, exclude: Set[str]) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantiser = MatMulNBitsQuantizer(model, nodes_to_exclude=sorted(exclude), algo_config=config)
    # The quantiser warns that it raises the opset to 21 (and the IR to 10) for int4
    # initializers "but the model may not be valid": the ops of decoder exports mean the same
    # at 21 (18 -> 21 widened their types), and onnxruntime runs the parts (the quality report
    # runs every quantised split). Its divide warnings come from all-zero blocks (scale 0),
    # which it maps to zero on purpose; it logs every node at INFO.
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with np.errstate(divide="ignore", invalid="ignore"):
            quantiser.process()
    finally:
        quiet.setLevel(level)
    result: onnx.ModelProto = quantiser.model.model
    return result


def quantize_unsplit(
    graph: ModelGraph, cut: CutPoint, head: WeightScheme, tail: WeightScheme
) -> onnx.ModelProto:
    """The whole model with each node's weights stored as its side of ``cut`` stores them: the
    unsplit reference a quantised split must reproduce token for token (tests, benchmarks).

    A side's nodes are its compute nodes and the weight views (Transpose of an initializer)
    they read, which the split copies into that side.
    """
    names: list[set[str]] = []
    for side in (range(cut.index), range(cut.index, len(graph.nodes))):
        views = {
            graph.constants[t].name
            for i in side
            for t in graph.node_inputs[i]
            if t in graph.constants
        }
        names.append({graph.nodes[i].name for i in side} | views)
    model = quantize_model(graph.model, head, exclude_nodes=names[1] - names[0])
    return quantize_model(model, tail, exclude_nodes=names[0] - names[1])


def _to_fp16_storage(model: onnx.ModelProto, exclude: Set[str]) -> onnx.ModelProto:
    """Float initializers stored as float16 and read through one Cast back to float32 by every
    node not in ``exclude`` (those keep reading the fp32 initializer)."""
    inits = _initializers(model)
    casts: dict[str, onnx.NodeProto] = {}
    added: list[onnx.TensorProto] = []
    for node in model.graph.node:
        if node.name in exclude:
            continue
        for j, name in enumerate(node.input):
            tensor = inits.get(name)
            if tensor is None or tensor.data_type not in FLOAT_TYPES:
                continue
            if name not in casts:
                array = numpy_helper.to_array(tensor).astype(np.float16)
                added.append(numpy_helper.from_array(array, f"{name}_fp16"))
                casts[name] = onnx.helper.make_node(
                    "Cast",
                    [f"{name}_fp16"],
                    [f"{name}_fp16_as_fp32"],
                    name=f"{name}_fp16_cast",
                    to=onnx.TensorProto.FLOAT,
                )
            node.input[j] = f"{name}_fp16_as_fp32"
    model.graph.initializer.extend(added)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend([*casts.values(), *nodes])
    _drop_unused_initializers(model)
    return model


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of a part's initializers as stored (what its weights cost on the device)."""
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.raw_data else numpy_helper.to_array(t).nbytes
    return total


def _matmulnbits_bytes(k: int, n: int, scheme: WeightScheme) -> int:
    """Stored size of a [K, N] weight as MatMulNBits keeps it (see the quantiser's
    ``qbits_block_quant``): packed blocks along K, one fp32 scale per block and column, and
    for asymmetric blocks a zero point per block (two per byte at 4 bits)."""
    blocks = -(-k // scheme.block)
    packed = n * blocks * (scheme.block * scheme.bits // 8)
    scales = n * blocks * 4
    per_byte = 8 // scheme.bits
    zeros = 0 if scheme.symmetric else n * (-(-blocks // per_byte))
    if scheme.method == "hqq":
        zeros = n * blocks * 4  # HQQ's zero points are floats
    return packed + scales + zeros


def _gather_bytes(rows: int, cols: int, scheme: WeightScheme) -> int:
    """Stored size of a [V, H] embedding as GatherBlockQuantized keeps it (int4, blocks along
    H): packed data, fp32 scales, int4 zero points when asymmetric (RTN under HQQ too)."""
    blocks = -(-cols // scheme.block)
    zeros = 0 if scheme.symmetric else -(-rows * blocks // 2)
    return -(-rows * cols // 2) + rows * blocks * 4 + zeros


def stored_weight_bytes(graph: ModelGraph, scheme: WeightScheme) -> dict[str, int]:
    """Bytes of each initializer a compute node of ``graph`` reads, stored under ``scheme``,
    and of each Transpose view that becomes a quantised MatMul weight.

    The same rules :func:`quantize_model` applies, as arithmetic on the shapes: MatMul weights
    (Transpose views of initializers too: they are materialised) become MatMulNBits blocks, an
    int4 scheme packs embedding Gathers, fp16 halves every float weight, the rest stays as it
    is. Used to price a quantised head before quantising it.
    """
    real = {t.name: (list(t.dims), t.data_type) for t in graph.model.graph.initializer}
    views: dict[str, list[int]] = {}
    for name, node in graph.constants.items():
        if node.op_type == "Transpose" and node.input and node.input[0] in real:
            dims = real[node.input[0]][0]
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            views[name] = [dims[p] for p in perm] if perm else dims[::-1]
    sizes: dict[str, int] = {}
    for node in graph.nodes:
        for position, name in enumerate(node.input):
            matmul_weight = node.op_type == "MatMul" and position == 1
            if name in views and scheme.quantised and matmul_weight and len(views[name]) == 2:
                sizes[name] = _matmulnbits_bytes(views[name][0], views[name][1], scheme)
            if name not in real:
                continue
            full = graph.initializers[name]
            dims, dtype = real[name]
            if dtype not in FLOAT_TYPES:
                sizes.setdefault(name, full)
            elif scheme.kind == "fp16":
                sizes[name] = full // 2
            elif scheme.quantised and matmul_weight and len(dims) == 2:
                sizes[name] = _matmulnbits_bytes(dims[0], dims[1], scheme)
            elif scheme.kind == "int4" and node.op_type == "Gather" and position == 0:
                sizes[name] = _gather_bytes(dims[0], dims[1], scheme) if len(dims) == 2 else full
            else:
                sizes.setdefault(name, full)
    return sizes


def priced_cuts(
    graph: ModelGraph, cuts: Sequence[CutPoint], scheme: WeightScheme
) -> list[CutPoint]:
    """``cuts`` with the head's weights priced as stored under ``scheme`` (fp32: as they are).

    Each stored tensor is charged once, at the first head node that needs it: a weight view
    (Identity/Cast of an initializer, or a Transpose the quantiser does not see) charges its
    source, a Transpose view that :func:`materialise_weight_views` turns into a quantised
    weight charges that weight.
    """
    if scheme.kind == "fp32":
        return list(cuts)
    sizes = stored_weight_bytes(graph, scheme)

    def stored(name: str) -> list[str]:
        view = graph.constants.get(name)
        if view is None or view.op_type not in WEIGHT_VIEW_OPS or name in sizes:
            return [name]
        return [s for i in view.input if i for s in stored(i)]

    def size(name: str) -> int:
        if name in sizes:
            return sizes[name]
        full = graph.initializers.get(name, 0)
        return full // 2 if scheme.kind == "fp16" and graph.dtypes.get(name) == "float32" else full

    added = [0] * (len(graph.nodes) + 1)
    seen: set[str] = set()
    for i, reads in enumerate(graph.node_inputs):
        for name in reads:
            if name not in graph.initializers:
                continue
            for source in stored(name):
                if source not in seen:
                    seen.add(source)
                    added[i + 1] += size(source)
    prefix = list(itertools.accumulate(added))
    return [replace(cut, head_weight_bytes=prefix[cut.index]) for cut in cuts]


def _weight_matmuls(model: onnx.ModelProto) -> int:
    inits = set(_initializers(model))
    return sum(1 for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits)


def weights_record(model: onnx.ModelProto, scheme: WeightScheme) -> dict[str, Any]:
    """What the manifest says about one part's weights."""
    ops = Counter(n.op_type for n in model.graph.node)
    record: dict[str, Any] = {"dtype": scheme.kind, "bits": scheme.bits}
    if scheme.quantised:
        record.update(
            scheme=scheme.method,
            compute=scheme.compute,
            accuracy_level=COMPUTE_TYPES[scheme.compute],
            block=scheme.block,
            symmetric=scheme.symmetric,
            quantiser=quantiser_version(),
            quantised_ops={
                "MatMulNBits": ops.get("MatMulNBits", 0),
                "GatherBlockQuantized": ops.get("GatherBlockQuantized", 0),
            },
            # MatMuls with a constant weight the quantiser left as they were (should be 0).
            fp32_weight_matmuls=_weight_matmuls(model),
        )
    elif scheme.kind == "fp16":
        record.update(scheme="fp16-storage", compute="fp32")
    record["weight_bytes"] = weight_bytes(model)
    return record
