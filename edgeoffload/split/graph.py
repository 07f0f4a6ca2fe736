"""Cut analysis and sub-model extraction for any ONNX graph (pure: no timing, no files).

A *cut* at position ``k`` puts the first ``k`` compute nodes (in topological order) on the
device (the head) and the rest on the server (the tail). The tensors that cross it are every
tensor produced in the head — or a graph input — that a tail node still reads. That covers
multi-tensor cuts through residual blocks and attention masks built once and read by every
layer. Rules that keep cuts safe:

* ``Constant`` nodes and initializers are not ordered: they go to whichever side uses them,
  to both sides if both do.
* Control-flow nodes (If/Loop/Scan) are atomic: a cut never goes through their bodies, and the
  outer-scope tensors their bodies read count as inputs of the node.
* A cut may not leave a graph output on the device (the server must produce every output),
  except the all-local cut.

``onnx.utils.Extractor`` is not used for sub-models: it needs full shape inference and its
node lookup is quadratic, which is too slow for LLM graphs with thousands of nodes; instead
nodes are indexed by output name once (see :meth:`ModelGraph.extract`).

The graph works on a ModelProto it is given; reading and checking model files is
:mod:`edgeoffload.split.loading`. A decoder's KV-cache state pairs are found by the exporters'
names in :mod:`edgeoffload.core.decoder`.
"""

from __future__ import annotations

import difflib
import heapq
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx

from edgeoffload.core.decoder import state_pairs
from edgeoffload.errors import CutError, GraphError
from edgeoffload.types import (
    DTYPE_SIZES,
    CutPoint,
    Dim,
    TensorSpec,
    dim_terms,
    resolve_dim,
    sample_array,
)

log = logging.getLogger("edgeoffload.split.graph")

CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})
# Ops whose weights make a "layer" for the privacy floor (min head depth), quantised weight
# ops included (int4/int8 exports of LLMs replace MatMul with MatMulNBits and friends).
PARAMETRIC_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "ConvInteger",
        "Gemm",
        "MatMul",
        "MatMulInteger",
        "MatMulNBits",
        "MatMulInteger16",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "QGemm",
        "QLinearConv",
        "QLinearMatMul",
        "Attention",
        "QAttention",
        "MultiHeadAttention",
        "DynamicQuantizeLSTM",
        "LSTM",
        "GRU",
        "RNN",
    }
)
# Ops whose output is a weight when all their inputs are weights (tied/aliased parameters).
WEIGHT_VIEW_OPS = frozenset({"Identity", "Transpose", "Cast"})


def layer_of(node_name: str) -> str:
    """A readable layer label from a hierarchical node name.

    ``/encoder/layer.0/attention/self/MatMul`` -> ``encoder/layer.0``; ``block3/dw/conv`` ->
    ``block3``; ``/Shape_3`` (hierarchical naming, top level) -> ``(top)``; a flat name such as
    ``Conv_12`` is its own label.
    """
    sep = "/" if "/" in node_name else "."
    parts = [p for p in node_name.strip(sep).split(sep) if p]
    if len(parts) <= 1:
        return "(top)" if sep in node_name else node_name
    for i, part in enumerate(parts[:-1]):
        if any(ch.isdigit() for ch in part):
            return sep.join(parts[: i + 1])
    return parts[0]


def _dtype_name(elem_type: int) -> str | None:
    try:
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    except (KeyError, ValueError, TypeError):
        return None
    name = np.dtype(np_dtype).name
    return name if name in DTYPE_SIZES else None


# Packed sub-byte initializers (int4 weights of GatherBlockQuantized): bits per element.
SUB_BYTE_BITS: dict[int, int] = {int(onnx.TensorProto.INT4): 4, int(onnx.TensorProto.UINT4): 4}


def _stored_bytes(init: onnx.TensorProto) -> int:
    """Bytes a weight takes as stored (quantised weights included)."""
    if init.raw_data:
        return len(init.raw_data)
    count = int(math.prod(init.dims))
    bits = SUB_BYTE_BITS.get(int(init.data_type))
    if bits is not None:
        return -(-count * bits // 8)
    return DTYPE_SIZES.get(_dtype_name(init.data_type) or "", 4) * count


def _dtype_of(vi: onnx.ValueInfoProto) -> str | None:
    if not vi.type.HasField("tensor_type"):
        return None
    return _dtype_name(vi.type.tensor_type.elem_type)


def _spec_from_value_info(vi: onnx.ValueInfoProto) -> TensorSpec | None:
    dtype = _dtype_of(vi)
    if dtype is None:
        return None
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None  # rank unknown: the size comes from a probe run
    dims: list[Dim] = []
    for i, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(f"{vi.name}:{i}")  # anonymous dim
    return TensorSpec(vi.name, dtype, tuple(dims))


def _subgraph_names(graph: onnx.GraphProto) -> tuple[set[str], set[str], set[str]]:
    """(outer-scope tensors read, node names, tensor names) of a subgraph, recursively."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    reads: set[str] = set()
    node_names: set[str] = set()
    tensor_names: set[str] = set(defined)
    for node in graph.node:
        node_names.add(node.name)
        reads.update(n for n in node.input if n)
        for attr in node.attribute:
            for sub in _attr_graphs(attr):
                sub_reads, sub_nodes, sub_tensors = _subgraph_names(sub)
                reads |= sub_reads
                node_names |= sub_nodes
                tensor_names |= sub_tensors
        defined.update(node.output)
        tensor_names.update(node.output)
    return reads - defined, node_names, tensor_names


def _attr_graphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    graphs = list(attr.graphs)
    if attr.HasField("g"):
        graphs.append(attr.g)
    return graphs


class ModelGraph:
    """An ONNX model prepared for cut analysis.

    Args:
        model: the model; it is not modified (a normalised copy is kept).
        sha256: hash of the serialized source model (identifies it in profiles and bundles);
            :func:`edgeoffload.split.loading.load_model` gives both.
        dims: values for symbolic dimensions, e.g. ``{"batch": 1, "sequence": 128}``. Dims
            whose name contains "batch" default to 1.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        *,
        sha256: str,
        dims: Mapping[str, int] | None = None,
        state: Mapping[str, str] | None = None,
    ) -> None:
        self.sha256 = sha256
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self._serialized: bytes | None = None
        graph = self.model.graph
        self._name_nodes(graph)

        self.initializers: dict[str, int] = {}  # name -> bytes
        for init in graph.initializer:
            self.initializers[init.name] = _stored_bytes(init)
        for sparse in graph.sparse_initializer:
            self.initializers[sparse.values.name] = 0

        self.constants: dict[str, onnx.NodeProto] = {}
        compute: list[onnx.NodeProto] = []
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and not node.input:
                for out in node.output:
                    self.constants[out] = node
            elif self._is_weight_view(node):
                # Exporters alias tied weights through Identity (and transpose them): treat
                # the result as a weight of whichever side reads it, never as an activation.
                for out in node.output:
                    self.constants[out] = node
                    self.initializers[out] = sum(self.initializers.get(i, 0) for i in node.input)
            else:
                compute.append(node)

        self.inputs: list[TensorSpec] = []
        for vi in graph.input:
            if vi.name in self.initializers:
                continue
            spec = _spec_from_value_info(vi)
            if spec is None:
                raise GraphError(f"graph input {vi.name!r} is not a tensor of a supported dtype")
            self.inputs.append(spec)
        self.output_names = [o.name for o in graph.output]
        input_names = [spec.name for spec in self.inputs]
        pairs = state_pairs(input_names, self.output_names) if state is None else state
        for name, out in pairs.items():
            if name not in input_names or out not in self.output_names:
                raise GraphError(f"state pair {name!r} -> {out!r}: not a graph input/output pair")
        # Recurrent state (an LLM's KV cache): an input fed back from an output of the previous
        # call. It never crosses the cut; it stays on the side that holds its layer.
        self.state: dict[str, str] = dict(pairs)
        self.state_outputs = set(self.state.values())

        # Effective inputs of each node: its own plus outer-scope reads of its subgraphs.
        self._subgraph_owner: dict[str, str] = {}
        effective_inputs: list[tuple[str, ...]] = []
        for node in compute:
            reads = [n for n in node.input if n]
            for attr in node.attribute:
                for sub in _attr_graphs(attr):
                    sub_reads, sub_nodes, sub_tensors = _subgraph_names(sub)
                    reads.extend(sorted(sub_reads))
                    for name in sub_nodes | sub_tensors:
                        self._subgraph_owner.setdefault(name, node.name)
            effective_inputs.append(tuple(dict.fromkeys(reads)))
        self.nodes, self.node_inputs = self._toposort(compute, effective_inputs)
        self.index_of_node = {n.name: i for i, n in enumerate(self.nodes)}
        self.producer: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = i

        self.specs = self._infer_specs()
        self.dims = self._resolve_dims(dims or {})
        self.layers = [layer_of(n.name) for n in self.nodes]
        distinct = len(set(self.layers))
        self.has_layer_structure = 0 < distinct <= max(1, len(self.nodes) // 2)
        self._probe: dict[str, TensorSpec] = {}

    # -- construction helpers -------------------------------------------------------------

    def serialized(self) -> bytes:
        """The (normalised) model as bytes, computed once: onnxruntime sessions, shape
        inference and the probe all need them, and serialising an LLM takes seconds."""
        if self._serialized is None:
            self._serialized = self.model.SerializeToString()
        return self._serialized

    def _is_weight_view(self, node: onnx.NodeProto) -> bool:
        return (
            node.op_type in WEIGHT_VIEW_OPS
            and node.domain in ("", "ai.onnx")
            and bool(node.input)
            and all(i in self.initializers or i in self.constants for i in node.input if i)
        )

    @staticmethod
    def _name_nodes(graph: onnx.GraphProto) -> None:
        """Give unnamed or duplicate-named nodes a stable, unique name (profiles key on names)."""
        taken = {node.name for node in graph.node if node.name}
        seen: set[str] = set()
        for i, node in enumerate(graph.node):
            if node.name and node.name not in seen:
                seen.add(node.name)
                continue
            base = f"{node.name or node.op_type}__{i}"
            candidate, suffix = base, 0
            while candidate in taken:
                suffix += 1
                candidate = f"{base}_{suffix}"
            node.name = candidate
            taken.add(candidate)
            seen.add(candidate)

    def _toposort(
        self, nodes: list[onnx.NodeProto], inputs: list[tuple[str, ...]]
    ) -> tuple[list[onnx.NodeProto], list[tuple[str, ...]]]:
        """Kahn's algorithm, keeping the file's order whenever it is already valid."""
        available = set(self.initializers) | set(self.constants) | {i.name for i in self.inputs}
        producers: dict[str, int] = {}
        for i, node in enumerate(nodes):
            for out in node.output:
                if out:
                    producers[out] = i
        waiting: dict[int, int] = {}
        dependents: dict[int, list[int]] = {}
        for i, reads in enumerate(inputs):
            deps = set()
            for name in reads:
                if name in available:
                    continue
                if name not in producers:
                    if name in self._subgraph_owner:
                        continue  # defined inside a subgraph scope
                    raise GraphError(
                        f"node {nodes[i].name!r} reads tensor {name!r} that nothing produces"
                    )
                deps.add(producers[name])
            waiting[i] = len(deps)
            for d in deps:
                dependents.setdefault(d, []).append(i)
        ready = [i for i, count in waiting.items() if count == 0]
        heapq.heapify(ready)
        order: list[int] = []
        while ready:
            i = heapq.heappop(ready)
            order.append(i)
            for j in dependents.get(i, ()):
                waiting[j] -= 1
                if waiting[j] == 0:
                    heapq.heappush(ready, j)
        if len(order) != len(nodes):
            raise GraphError("the graph has a cycle")
        return [nodes[i] for i in order], [inputs[i] for i in order]

    def _infer_specs(self) -> dict[str, TensorSpec]:
        try:
            inferred = onnx.shape_inference.infer_shapes(self.serialized(), strict_mode=False)
        except Exception as exc:  # inference is a help, not a requirement
            log.warning("shape inference failed (%s); sizes come from a probe run", exc)
            inferred = self.model
        specs: dict[str, TensorSpec] = {}
        self.dtypes: dict[str, str] = {}
        graph = inferred.graph
        for vi in [*graph.input, *graph.value_info, *graph.output]:
            dtype = _dtype_of(vi)
            if dtype is not None:
                self.dtypes[vi.name] = dtype
            spec = _spec_from_value_info(vi)
            if spec is not None:
                specs[vi.name] = spec
        return specs

    def _resolve_dims(self, given: Mapping[str, int]) -> dict[str, int]:
        dims = dict(given)
        for name, value in dims.items():
            # 0 is valid: an empty KV cache before the prompt's prefill.
            if not isinstance(value, int) or value < 0:
                raise GraphError(f"dimension {name}={value!r}: values must be integers >= 0")
        known = {
            term
            for spec in self.inputs
            for d in spec.shape
            if isinstance(d, str)
            for term in dim_terms(d)
            if not term.isdigit()
        }
        unknown = sorted(set(given) - known)
        if unknown:
            raise GraphError(
                f"--dim {', '.join(unknown)}: no graph input has such a dimension",
                hint=f"symbolic input dims are: {', '.join(sorted(known)) or 'none'}",
            )
        for dim in known:
            if dim not in dims and "batch" in dim.lower():
                dims[dim] = 1
        return dims

    # -- inputs -----------------------------------------------------------------------------

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Concrete shapes of the graph inputs; a missing symbolic dim is a GraphError."""
        shapes: dict[str, tuple[int, ...]] = {}
        for spec in self.inputs:
            shape = spec.resolved(self.dims)
            if shape is None:
                missing = sorted(
                    {
                        term
                        for d in spec.shape
                        if isinstance(d, str) and resolve_dim(d, self.dims) is None
                        for term in dim_terms(d)
                        if not term.isdigit() and term not in self.dims
                    }
                )
                raise GraphError(
                    f"input {spec.name!r} has symbolic dim(s) {', '.join(map(str, missing))}",
                    hint=" ".join(f"--dim {d}=N" for d in missing) + " gives their values",
                )
            shapes[spec.name] = shape
        return shapes

    def sample_inputs(self, *, seed: int = 0) -> dict[str, np.ndarray]:
        """Deterministic sample inputs for verification and profiling.

        Floats are standard normal; integer inputs named like masks are ones, token types
        zeros, position ids a range, other integers (token ids) uniform in [0, 100).
        """
        rng = np.random.default_rng(seed)
        arrays: dict[str, np.ndarray] = {}
        shapes = self.input_shapes()
        for spec in self.inputs:
            arrays[spec.name] = sample_array(
                spec.name, np.dtype(spec.dtype), tuple(shapes[spec.name]), rng
            )
        return arrays

    # -- cut analysis -------------------------------------------------------------------------

    def set_probe(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Record dtypes/shapes observed in a real run; used where shape inference has none."""
        self._probe = {
            name: TensorSpec(name, arr.dtype.name, tuple(int(d) for d in arr.shape))
            for name, arr in arrays.items()
        }

    def tensor_spec(self, name: str) -> TensorSpec:
        """Dtype and (possibly symbolic) shape of a tensor."""
        spec = self.specs.get(name) or self._probe.get(name)
        if spec is None:
            raise GraphError(
                f"tensor {name!r} has no type or shape from shape inference",
                hint="a probe run with sample inputs resolves it (split and cuts do this)",
            )
        return spec

    def tensor_bytes(self, name: str) -> int:
        """Size of a tensor at the resolved dims (or as observed in the probe run)."""
        size = self.tensor_spec(name).nbytes(self.dims)
        if size is None and name in self._probe:
            size = self._probe[name].nbytes()
        if size is None:
            raise GraphError(
                f"cannot size tensor {name!r} with shape {list(self.tensor_spec(name).shape)}",
                hint="give --dim values, or let a probe run with sample inputs resolve it",
            )
        return size

    def _last_use(self) -> dict[str, int]:
        """Index of the last compute node reading each tensor (n for graph outputs)."""
        n = len(self.nodes)
        last: dict[str, int] = {}
        for i, reads in enumerate(self.node_inputs):
            for name in reads:
                last[name] = i
        for name in self.output_names:
            if name not in self.state_outputs:
                last[name] = n
        return last

    def _state_spans(self) -> list[tuple[int, int]]:
        """For each state pair, the node range [first, last] that must stay on one side."""
        readers: dict[str, list[int]] = {}
        for i, reads in enumerate(self.node_inputs):
            for name in reads:
                if name in self.state or name in self.state_outputs:
                    readers.setdefault(name, []).append(i)
        spans = []
        for name, out in self.state.items():
            # Attention reads the updated cache (the present tensor) after producing it: those
            # readers belong to the same side too, or the whole cache would cross every call.
            touched = (
                readers.get(name, [])
                + readers.get(out, [])
                + ([self.producer[out]] if out in self.producer else [])
            )
            if touched:
                spans.append((min(touched), max(touched)))
        return spans

    def cuts(self) -> list[CutPoint]:
        """Every valid cut in topological order, from all-remote (0) to all-local (n)."""
        n = len(self.nodes)
        last = self._last_use()
        graph_inputs = {spec.name for spec in self.inputs}
        output_producers = {
            self.producer[o]
            for o in self.output_names
            if o in self.producer and o not in self.state_outputs
        }
        # A cut inside a state span would put a layer's cache read and its update on two sides.
        split_state = [False] * (n + 1)
        for lo, hi in self._state_spans():
            for k in range(lo + 1, hi + 1):
                split_state[k] = True
        first_output = min(output_producers) if output_producers else n
        # crossing[k]: tensors t with producer p < k <= last use (graph inputs: p = -1).
        start_events: dict[int, list[str]] = {}
        for name, use in last.items():
            if name in self.initializers or name in self.constants or name in self.state:
                continue
            if name in graph_inputs:
                p = -1
            elif name in self.producer:
                p = self.producer[name]
            else:
                continue
            if use > p:
                start_events.setdefault(p + 1, []).append(name)

        # Live activation bytes at each step i: tensors produced at or before i and read at
        # or after i; the peak over the head is a prefix maximum.
        delta = [0] * (n + 2)
        for name, use in last.items():
            if name in self.initializers or name in self.constants:
                continue
            if name in graph_inputs:
                p = 0
            elif name in self.producer:
                p = self.producer[name]
            else:
                continue
            size = self._safe_bytes(name)
            delta[p] += size
            delta[min(use, n) + 1] -= size
        for i, node in enumerate(self.nodes):  # outputs nobody reads still get allocated
            for out in node.output:
                if out and out not in last:
                    size = self._safe_bytes(out)
                    delta[i] += size
                    delta[i + 1] -= size

        first_use_of_weight: dict[str, int] = {}
        for i, reads in enumerate(self.node_inputs):
            for name in reads:
                if name in self.initializers or name in self.constants:
                    first_use_of_weight.setdefault(name, i)
        weight_added = [0] * (n + 1)
        for name, i in first_use_of_weight.items():
            weight_added[i] += self.initializers.get(name, 0)

        cuts: list[CutPoint] = []
        active: dict[str, None] = {}
        live = 0
        peak = 0
        weights = 0
        depth = 0
        for k in range(n + 1):
            if k > 0:
                i = k - 1
                live += delta[i]
                peak = max(peak, live)
                weights += weight_added[i]
                if self.nodes[i].op_type in PARAMETRIC_OPS:
                    depth += 1
            for name in start_events.get(k, ()):
                active[name] = None
            for name in [t for t in active if last[t] < k]:
                del active[name]
            if 0 < k < n and (k > first_output or split_state[k]):
                continue  # a graph output would stay on the device, or a state pair split
            crossing = tuple(sorted(active, key=self._order_key)) if k < n else ()
            after = self.nodes[k - 1].name if k > 0 else ""
            layer = self.layers[k - 1] if k > 0 else ""
            boundary = k in (0, n) or self.layers[k - 1] != self.layers[k]
            cuts.append(
                CutPoint(
                    index=k,
                    after=after,
                    layer=layer,
                    boundary=boundary,
                    tensors=tuple(self.tensor_spec(t) for t in crossing),
                    nbytes=sum(self.tensor_bytes(t) for t in crossing),
                    head_weight_bytes=weights,
                    head_peak_bytes=peak,
                    head_depth=depth,
                )
            )
        return cuts

    def _safe_bytes(self, name: str) -> int:
        try:
            return self.tensor_bytes(name)
        except GraphError:
            return 0

    def _order_key(self, name: str) -> tuple[int, str]:
        return (self.producer.get(name, -1), name)

    def output_bytes(self) -> int:
        return sum(self.tensor_bytes(o) for o in self.output_names)

    def input_bytes(self) -> int:
        return sum(self.tensor_bytes(i.name) for i in self.inputs)

    # -- finding a cut by name ----------------------------------------------------------------

    def find_cut(self, key: str, cuts: Sequence[CutPoint] | None = None) -> CutPoint:
        """A cut by id (``c42``), by the name of its last head node, or by a tensor name.

        A tensor name selects the cut right after the node that produces it.
        """
        cuts = list(cuts) if cuts is not None else self.cuts()
        by_index = {c.index: c for c in cuts}
        n = len(self.nodes)
        aliases = {"all-remote": 0, "remote": 0, "all-local": n, "local": n}
        index: int | None = None
        if key in aliases:
            index = aliases[key]
        elif re.fullmatch(r"c\d+", key):
            index = int(key[1:])
        elif key in self.index_of_node:
            index = self.index_of_node[key] + 1
        elif key in self.producer:
            index = self.producer[key] + 1
        elif key in self._subgraph_owner:
            owner = self._subgraph_owner[key]
            raise CutError(
                f"cannot cut at {key!r}: it is inside the body of control-flow node {owner!r}",
                hint=f"cut before or after {owner!r} instead",
            )
        if index is None:
            candidates = [*self.index_of_node, *self.producer, *(c.id for c in cuts)]
            close = difflib.get_close_matches(key, candidates, n=3)
            hint = (
                f"did you mean {', '.join(close)}?"
                if close
                else "list cuts with: edgeoffload cuts MODEL"
            )
            raise CutError(f"no cut named {key!r} in this model", hint=hint)
        if index not in by_index:
            if 0 <= index <= n:
                raise CutError(
                    f"cut {key!r} would leave a graph output on the device",
                    hint="only cuts before the first graph output's producer are valid",
                )
            raise CutError(f"no cut {key!r}: the model has cuts c0..c{n}")
        return by_index[index]

    # -- extraction ---------------------------------------------------------------------------

    def extract(
        self, node_range: range, inputs: Iterable[str], outputs: Iterable[str], name: str
    ) -> onnx.ModelProto:
        """A standalone model of ``nodes[node_range]`` with the given graph inputs/outputs."""
        src = self.model
        nodes = [self.nodes[i] for i in node_range]
        reads: set[str] = set()
        for i in node_range:
            reads.update(self.node_inputs[i])
        constant_nodes: list[onnx.NodeProto] = []
        seen_constants: set[int] = set()
        pending = sorted(reads)
        while pending:  # weight views read other constants: take those too
            tensor = pending.pop()
            const = self.constants.get(tensor)
            if const is not None and id(const) not in seen_constants:
                seen_constants.add(id(const))
                constant_nodes.append(const)
                new = [i for i in const.input if i and i not in reads]
                reads.update(new)
                pending.extend(new)
        # A weight view must come after the constants it reads: keep the file's order.
        file_order = {id(node): i for i, node in enumerate(src.graph.node)}
        constant_nodes.sort(key=lambda node: file_order.get(id(node), -1))
        graph = onnx.GraphProto(name=name)
        graph.node.extend(constant_nodes + nodes)
        graph.initializer.extend(t for t in src.graph.initializer if t.name in reads)
        graph.sparse_initializer.extend(
            t for t in src.graph.sparse_initializer if t.values.name in reads
        )
        graph.input.extend(self._value_info(t) for t in inputs)
        graph.output.extend(self._value_info(t) for t in outputs)
        model = onnx.ModelProto()
        model.ir_version = src.ir_version
        model.opset_import.extend(src.opset_import)
        model.functions.extend(src.functions)
        model.producer_name = "edgeoffload"
        model.graph.CopyFrom(graph)
        return model

    def _value_info(self, name: str) -> onnx.ValueInfoProto:
        spec = self.tensor_spec(name)
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype))
        return onnx.helper.make_tensor_value_info(name, elem, list(spec.shape))

    def head_inputs(self, cut: CutPoint) -> list[str]:
        """Graph inputs the head reads, in graph-input order."""
        reads: set[str] = set()
        for i in range(cut.index):
            reads.update(self.node_inputs[i])
        return [spec.name for spec in self.inputs if spec.name in reads]

    def head_outputs(self, cut: CutPoint) -> list[str]:
        """Crossing tensors the head produces (the rest are graph inputs passed through),
        then the state outputs of the head's layers."""
        graph_inputs = {spec.name for spec in self.inputs}
        crossing = [t.name for t in cut.tensors if t.name not in graph_inputs]
        return crossing + self.state_outputs_of(range(cut.index))

    def state_outputs_of(self, node_range: range) -> list[str]:
        """State outputs produced by the nodes in ``node_range``, in graph-output order."""
        return [
            o
            for o in self.output_names
            if o in self.state_outputs and self.producer.get(o, -1) in node_range
        ]

    def state_inputs_of(self, node_range: range) -> list[str]:
        """State inputs read by the nodes in ``node_range``, in graph-input order."""
        reads: set[str] = set()
        for i in node_range:
            reads.update(self.node_inputs[i])
        return [spec.name for spec in self.inputs if spec.name in self.state and spec.name in reads]

    def split(self, cut: CutPoint) -> tuple[onnx.ModelProto | None, onnx.ModelProto | None]:
        """(head, tail) models for a cut; None for the empty side of all-remote/all-local."""
        n = len(self.nodes)
        crossing = [t.name for t in cut.tensors]
        head = None
        tail = None
        if cut.index > 0:
            outputs = self.output_names if cut.index == n else self.head_outputs(cut)
            head = self.extract(range(cut.index), self.head_inputs(cut), outputs, "head")
        if cut.index < n:
            rest = range(cut.index, n)
            outputs = [o for o in self.output_names if o not in self.state_outputs]
            tail = self.extract(
                rest,
                crossing + self.state_inputs_of(rest),
                outputs + self.state_outputs_of(rest),
                "tail",
            )
        return head, tail
