"""Decoder LLM analysis and splitting: KV-cache state pairs, block cuts, split_decoder, bundles.

The tiny random-weight Llama and GPT-2 (4 blocks each, exported with past key values by
optimum, tests/conftest.py) are analysed and split at every block boundary; each split is
verified by split_decoder itself (greedy decoding through head + tail, each side feeding its
own KV cache back, against the full model in onnxruntime) and its bundle is loaded back with
every hash checked. Small graphs built with onnx.helper cover the pure parts: state naming,
symbolic dims that are sums, and tied weights aliased through Identity/Transpose/Cast.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeoffload._ort import make_session, run
from edgeoffload.bundle import load_bundle
from edgeoffload.core.decoder import block_of, state_pairs
from edgeoffload.errors import GraphError, ManifestError, UsageError
from edgeoffload.split.analysis import Analysis
from edgeoffload.split.decoder_split import (
    TOKENIZER_FILES,
    DecoderAnalysis,
    block_cuts,
    layout_of,
    split_decoder,
    tokenizer_files,
)
from edgeoffload.split.graph import WEIGHT_VIEW_OPS
from edgeoffload.split.loading import load_model
from edgeoffload.types import TensorSpec, dim_terms, resolve_dim

KINDS = ("llama", "gpt2")
NUM_LAYERS = 4  # the conftest decoders
F = TensorProto.FLOAT
STATE_NAME = re.compile(r"^(past_key_values|present)[._]\d+[._](key|value)$")


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoder_dirs(request: pytest.FixtureRequest) -> dict[str, Path]:
    """Export folders (model.onnx + tokenizer files) of the tiny decoders, built once."""
    return {kind: request.getfixturevalue(f"tiny_{kind}_dir") for kind in KINDS}


@pytest.fixture(scope="module")
def analyses(decoder_dirs: dict[str, Path]) -> dict[str, Analysis]:
    """Each decoder analysed for one decode step (the default dims of a decoder)."""
    return {kind: Analysis.of(folder / "model.onnx") for kind, folder in decoder_dirs.items()}


@pytest.fixture(scope="module")
def split_bundles(
    decoder_dirs: dict[str, Path],
    analyses: dict[str, Analysis],
    tmp_path_factory: pytest.TempPathFactory,
) -> Any:
    """``get(kind, head_layers)``: the decoder split there (None: all-local), once each."""
    cache: dict[tuple[str, int | None], Any] = {}

    def get(kind: str, head_layers: int | None) -> Any:
        if (kind, head_layers) not in cache:
            out = tmp_path_factory.mktemp(f"split-{kind}-{head_layers}") / "bundle"
            cache[kind, head_layers] = split_decoder(
                decoder_dirs[kind] / "model.onnx",
                out,
                head_layers=head_layers,
                analysis=analyses[kind],
            )
        return cache[kind, head_layers]

    return get


def _layer(name: str) -> int:
    match = re.search(r"(\d+)", name)
    assert match, name
    return int(match.group(1))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- state pairs: naming -------------------------------------------------------------------------


def test_state_pairs_naming_variants() -> None:
    inputs = [
        "input_ids",
        "past_key_values.0.key",
        "past_key_values.0.value",
        "past_key_values_1_key",
        "past_key_values_1_value",
        "past.2.key",
        "past.2.value",
        "past_key_values.3.key",  # its present is missing: not state
        "past_key_values.4.key",  # its present uses the other scheme: not state
        "past_key_values.5.query",  # not a key or a value
        "my_past_key_values.6.key",  # a prefix is not the export naming
    ]
    outputs = [
        "logits",
        "present.0.key",
        "present.0.value",
        "present_1_key",
        "present_1_value",
        "present.2.key",
        "present.2.value",
        "present_4_key",
        "present.5.query",
        "present.6.key",
    ]
    assert state_pairs(inputs, outputs) == {
        "past_key_values.0.key": "present.0.key",
        "past_key_values.0.value": "present.0.value",
        "past_key_values_1_key": "present_1_key",
        "past_key_values_1_value": "present_1_value",
        "past.2.key": "present.2.key",
        "past.2.value": "present.2.value",
    }
    assert state_pairs(["x"], ["y"]) == {}
    assert state_pairs(["past_key_values.12.value"], ["present.12.value"]) == {
        "past_key_values.12.value": "present.12.value"
    }


def _state_toy(
    *,
    kv_in: str = "past_key_values.0.key",
    kv_out: str = "present.0.key",
    read_update: bool = False,
) -> Any:
    """x -> relu -> a; kv_in * 2 -> s; sigmoid(a) -> b; s + b -> kv_out; tanh(b) -> y.

    The cache read (node 1) and its update (node 3) must stay on one side: no cut at 2 or 3.
    With ``read_update`` the last node also reads the updated cache (as attention reads the
    concatenated keys after a decoder's Concat): y = b + kv_out.
    """
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="layers.0/relu"),
        helper.make_node("Mul", [kv_in, "two"], ["s"], name="layers.0/read"),
        helper.make_node("Sigmoid", ["a"], ["b"], name="layers.0/sigmoid"),
        helper.make_node("Add", ["s", "b"], [kv_out], name="layers.0/update"),
        helper.make_node("Add", ["b", kv_out], ["y"], name="out/add")
        if read_update
        else helper.make_node("Tanh", ["b"], ["y"], name="out/tanh"),
    ]
    graph = helper.make_graph(
        nodes,
        "state-toy",
        [
            helper.make_tensor_value_info("x", F, [1, 4]),
            helper.make_tensor_value_info(kv_in, F, [1, 4]),
        ],
        [
            helper.make_tensor_value_info("y", F, [1, 4]),
            helper.make_tensor_value_info(kv_out, F, [1, 4]),
        ],
        [numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_state_span_is_never_cut_and_state_never_crosses() -> None:
    graph = load_model(_state_toy()).graph()
    assert graph.state == {"past_key_values.0.key": "present.0.key"}
    cuts = graph.cuts()
    assert [c.index for c in cuts] == [0, 1, 4, 5]
    for cut in cuts:
        names = {t.name for t in cut.tensors}
        assert "past_key_values.0.key" not in names and "present.0.key" not in names
    # The head of the cut at 4 keeps the state: it reads the past and produces the present.
    head, tail = graph.split(next(c for c in cuts if c.index == 4))
    assert head is not None and tail is not None
    assert "past_key_values.0.key" in [i.name for i in head.graph.input]
    assert "present.0.key" in [o.name for o in head.graph.output]
    assert "past_key_values.0.key" not in [i.name for i in tail.graph.input]
    assert [o.name for o in tail.graph.output] == ["y"]


def test_a_cache_update_read_later_is_not_sent_across() -> None:
    """The updated cache (``present``) read by a later node keeps that node on its side.

    Fails today: ModelGraph._state_spans spans only the readers of the past input and the
    producer of the present output, so the cut after the update (c4) is offered and sends the
    layer's whole updated cache across, every call.
    """
    graph = load_model(_state_toy(read_update=True)).graph()
    cuts = graph.cuts()
    for cut in cuts:
        assert "present.0.key" not in {t.name for t in cut.tensors}, cut.id
    assert [c.index for c in cuts] == [0, 1, 5]


def test_explicit_state_for_other_naming_and_bad_pairs() -> None:
    model = _state_toy(kv_in="cache_in", kv_out="cache_out")
    # Not an export naming: no state unless given, so the cache may be cut apart.
    plain = load_model(model).graph()
    assert plain.state == {}
    assert [c.index for c in plain.cuts()] == [0, 1, 2, 3, 5]
    given = load_model(model).graph(state={"cache_in": "cache_out"})
    assert given.state == {"cache_in": "cache_out"}
    assert [c.index for c in given.cuts()] == [0, 1, 4, 5]
    assert given.state_inputs_of(range(0, 4)) == ["cache_in"]
    assert given.state_outputs_of(range(0, 4)) == ["cache_out"]
    assert given.state_inputs_of(range(4, 5)) == [] and given.state_outputs_of(range(4, 5)) == []
    # An explicit empty mapping switches detection off.
    assert load_model(_state_toy()).graph(state={}).state == {}
    for bad in ({"cache_in": "y_missing"}, {"nope": "cache_out"}, {"cache_out": "cache_in"}):
        with pytest.raises(GraphError, match="state pair"):
            load_model(model).graph(state=bad)


# -- state pairs and block cuts on the real exports ------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_no_cut_separates_a_layers_cache_read_from_its_update(analyses, kind) -> None:
    analysis = analyses[kind]
    graph = analysis.graph
    assert len(graph.state) == 2 * NUM_LAYERS
    assert all(STATE_NAME.match(i) and STATE_NAME.match(o) for i, o in graph.state.items())
    touched: dict[str, list[int]] = {name: [] for name in graph.state}
    for i, reads in enumerate(graph.node_inputs):
        for name in reads:
            if name in touched:
                touched[name].append(i)
    for past, present in graph.state.items():
        touched[past].append(graph.producer[present])
    n = len(graph.nodes)
    assert len(analysis.cuts) > 2 * NUM_LAYERS
    for cut in analysis.cuts:
        k = cut.index
        for past, nodes in touched.items():
            sides = {i < k for i in nodes}
            assert len(sides) == 1, f"{cut.id} separates {past} from {graph.state[past]}"
        head_in = graph.state_inputs_of(range(k))
        tail_in = graph.state_inputs_of(range(k, n))
        assert set(head_in).isdisjoint(tail_in)
        assert sorted(head_in + tail_in) == sorted(graph.state)
        assert sorted(graph.state[p] for p in head_in) == sorted(graph.state_outputs_of(range(k)))
        assert sorted(graph.state[p] for p in tail_in) == sorted(
            graph.state_outputs_of(range(k, n))
        )


@pytest.mark.parametrize("kind", KINDS)
def test_state_tensors_never_cross_a_cut(analyses, kind) -> None:
    """README: past_key_values.i / present.i are state of the side that holds layer i and never
    cross. Attention reads the updated cache (the Concat that makes present.i) after it is
    produced, so the cuts between that Concat and the attention's last read must not exist.

    Fails today: the cut right after each layer's Concat is offered and carries present.i.*
    (the whole KV cache of the layer, growing with the context).
    """
    graph = analyses[kind].graph
    state_names = set(graph.state) | set(graph.state.values())
    crossing = {
        cut.id: sorted(state_names & {t.name for t in cut.tensors}) for cut in analyses[kind].cuts
    }
    bad = {cut: names for cut, names in crossing.items() if names}
    assert not bad, f"{len(bad)} cuts send KV state, e.g. {next(iter(bad.items()))}"


def _cuts_near_cache_updates(analysis: Analysis) -> list[Any]:
    """Offered cuts within two nodes after the Concat producing present.{0,2}.*, plus a spread
    of other cuts inside the blocks."""
    graph = analysis.graph
    near = {
        graph.producer[out] + d
        for past, out in graph.state.items()
        if _layer(past) in (0, 2)
        for d in (1, 2)
    }
    offered = {c.index: c for c in analysis.cuts}
    chosen = [offered[k] for k in sorted(near) if k in offered]
    inner = [c for c in analysis.cuts if 0 < c.index < len(graph.nodes) and not c.boundary]
    chosen += inner[:: max(1, len(inner) // 6)]
    return chosen


@pytest.mark.parametrize("kind", KINDS)
def test_offered_cuts_inside_blocks_split_and_verify(analyses, kind, tmp_path) -> None:
    """Any cut the analysis offers must split into a verified bundle (greedy decoding with each
    side feeding its own cache back), not only the block boundaries.

    Fails today with a bare KeyError('present.0.key') from verify_generation at the cut right
    after a layer's cache update: the head lists present.0.key twice among its outputs (as a
    crossing tensor and as its own state) and its KVState keeps it, so the tail never gets it.
    """
    from edgeoffload.split.splitter import split_model

    analysis = analyses[kind]
    for i, cut in enumerate(_cuts_near_cache_updates(analysis)):
        bundle = split_model(analysis, cut, tmp_path / f"b{i}")
        assert bundle.manifest.verification["generation"]["exact"] is True, cut.id
        load_bundle(bundle.path)


@pytest.mark.parametrize("kind", KINDS)
def test_block_cuts_are_block_boundaries_without_state(analyses, kind) -> None:
    analysis = analyses[kind]
    graph = analysis.graph
    layout = layout_of(analysis)
    assert layout.num_layers == NUM_LAYERS
    blocks = block_cuts(analysis)
    assert sorted(blocks) == list(range(NUM_LAYERS + 1))
    assert blocks[0].index == 0
    indices = [blocks[k].index for k in range(NUM_LAYERS + 1)]
    assert indices == sorted(set(indices)), "one cut per block, in order"
    assert indices[-1] < len(graph.nodes), "the server keeps the final norm and the LM head"
    for k, cut in blocks.items():
        assert cut.boundary
        names = [t.name for t in cut.tensors]
        assert names, f"something crosses after {k} blocks"
        assert not any("past_key_values" in t or "present" in t for t in names), (k, names)
        assert not set(names) & (set(graph.state) | set(graph.state.values()))
        if k > 0:
            assert block_of(cut.layer) == k - 1
            # The device holds exactly the caches of its blocks.
            head_state = graph.state_inputs_of(range(cut.index))
            assert {_layer(p) for p in head_state} == set(range(k))
        else:
            assert names == sorted(["input_ids", "attention_mask", "position_ids"])
    # Between blocks only the residual stream and what was built before layer 0 crosses:
    # a few tensors, far smaller than any KV cache.
    for k in range(1, NUM_LAYERS + 1):
        assert len(blocks[k].tensors) <= 4
        assert blocks[k].nbytes < layout.kv_bytes_per_token() * 128


@pytest.mark.parametrize("kind", KINDS)
def test_split_decoder_at_every_block_cut_and_all_local(
    analyses, decoder_dirs, split_bundles, kind
) -> None:
    analysis = analyses[kind]
    folder = decoder_dirs[kind]
    expected_files = {
        f"tokenizer/{name}": folder / name for name in TOKENIZER_FILES if (folder / name).is_file()
    }
    assert {"tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"} <= set(expected_files)
    assert tokenizer_files(folder / "model.onnx") == expected_files
    all_past = list(analysis.graph.state)
    for head_layers in [*sorted(block_cuts(analysis)), None]:
        bundle = split_bundles(kind, head_layers)
        m = bundle.manifest
        label = f"{kind} head_layers={head_layers}"
        assert m.verification["generation"]["exact"] is True, label
        assert m.verification["generation"]["steps"] >= 1
        assert m.verification["exact"] is True, label
        assert m.codec == "none"
        # Which side keeps which layer's cache.
        on_device = set(range(NUM_LAYERS)) if head_layers is None else set(range(head_layers))
        assert len(m.state) == len(all_past)
        for entry in m.state:
            assert entry["output"] == analysis.graph.state[entry["input"]]
            side = "device" if _layer(entry["input"]) in on_device else "server"
            assert entry["side"] == side, (label, entry)
        device_past = sorted(e["input"] for e in m.state if e["side"] == "device")
        server_past = sorted(e["input"] for e in m.state if e["side"] == "server")
        # The parts read exactly their own side's cache and produce its update.
        for part, past in ((m.head, device_past), (m.tail, server_past)):
            if part is None:
                assert not past, label
                continue
            proto = onnx.load(str(bundle.path / part.file))
            ins = sorted(i.name for i in proto.graph.input if i.name in analysis.graph.state)
            outs = sorted(o.name for o in proto.graph.output if STATE_NAME.match(o.name))
            assert ins == past, (label, part.file)
            assert outs == sorted(analysis.graph.state[p] for p in past), (label, part.file)
            assert [t.name for t in part.inputs] == [i.name for i in proto.graph.input]
        assert (m.head is None) == (head_layers == 0), label
        assert (m.tail is None) == (head_layers is None), label
        assert not any(STATE_NAME.match(t.name) for t in m.crossing), label
        # Tokenizer files: copied byte for byte and pinned by hash.
        assert set(m.files) == set(expected_files), label
        for rel, src in expected_files.items():
            copied = bundle.path / rel
            assert copied.read_bytes() == src.read_bytes()
            assert m.files[rel] == _sha256(copied)
        reloaded = load_bundle(bundle.path)
        assert reloaded.manifest.to_dict() == m.to_dict()


def test_all_local_and_all_remote_bundles(analyses, split_bundles) -> None:
    n = len(analyses["gpt2"].graph.nodes)
    local = split_bundles("gpt2", None).manifest
    assert local.tail is None and not local.crossing and local.cut_id == f"c{n}"
    assert all(e["side"] == "device" for e in local.state)
    remote = split_bundles("gpt2", 0).manifest
    assert remote.head is None and remote.cut_id == "c0"
    assert all(e["side"] == "server" for e in remote.state)
    # All-remote sends the token ids, the mask and the positions as given.
    assert sorted(remote.passthrough) == ["attention_mask", "input_ids", "position_ids"]


# -- bundle files: hashed, and only inside the bundle ----------------------------------------------


@pytest.fixture()
def bundle_copy(split_bundles, tmp_path: Path) -> Path:
    src = split_bundles("llama", 2).path
    dst = tmp_path / "bundle"
    shutil.copytree(src, dst)
    return dst


def test_tampered_tokenizer_file_is_refused(bundle_copy: Path) -> None:
    load_bundle(bundle_copy)  # intact
    target = bundle_copy / "tokenizer" / "tokenizer_config.json"
    config = json.loads(target.read_text())
    config["chat_template"] = "{{ 'pwned' }}"
    target.write_text(json.dumps(config))
    with pytest.raises(ManifestError, match=r"tokenizer/tokenizer_config\.json"):
        load_bundle(bundle_copy)
    load_bundle(bundle_copy, verify=False)  # explicit opt-out still reads the manifest


def test_missing_tokenizer_file_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(ManifestError, match="missing"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    "rel",
    [
        "../outside.json",
        "tokenizer/../../outside.json",
        "/etc/hostname",
        "\\windows\\path.json",
        "tokenizer\\..\\..\\outside.json",
        "./tokenizer/tokenizer.json",
        "tokenizer//tokenizer.json",
        "",
    ],
)
def test_manifest_files_entry_must_stay_inside_the_bundle(bundle_copy: Path, rel: str) -> None:
    # A file outside the bundle whose hash the manifest names correctly: still refused.
    outside = bundle_copy.parent / "outside.json"
    outside.write_text('{"x": 1}')
    manifest_path = bundle_copy / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["files"][rel] = _sha256(outside)
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="safe relative path"):
        load_bundle(bundle_copy)
    with pytest.raises(ManifestError, match="safe relative path"):
        load_bundle(bundle_copy, verify=False)


def test_manifest_files_digest_must_be_a_string(bundle_copy: Path) -> None:
    manifest_path = bundle_copy / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["files"]["tokenizer/tokenizer.json"] = 123
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(ManifestError):
        load_bundle(bundle_copy)


# -- explicit dims: the prefill with an empty cache ------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_analysis_with_an_empty_cache(decoder_dirs, analyses, kind) -> None:
    model = decoder_dirs[kind] / "model.onnx"
    prefill = Analysis.of(model, dims={"sequence_length": 5, "past_sequence_length": 0})
    graph = prefill.graph
    assert graph.dims["past_sequence_length"] == 0 and graph.dims["sequence_length"] == 5
    for name in graph.state:
        assert prefill.inputs[name].shape[2] == 0
    assert prefill.inputs["attention_mask"].shape == (1, 5)  # past + sequence
    assert prefill.reference["logits"].shape[:2] == (1, 5)
    for present in graph.state.values():
        assert prefill.reference[present].shape[2] == 5
    # Same graph, same block boundaries; five positions cross where the step sends one.
    step_blocks = block_cuts(analyses[kind])
    blocks = block_cuts(prefill)
    assert {k: c.index for k, c in blocks.items()} == {k: c.index for k, c in step_blocks.items()}
    for k in range(1, NUM_LAYERS + 1):
        residual = [t for t in blocks[k].tensors if t.name.endswith("Add_1_output_0")]
        assert len(residual) == 1
        assert graph.tensor_bytes(residual[0].name) == 5 * analyses[kind].graph.tensor_bytes(
            residual[0].name
        )


def test_split_with_a_prefill_analysis_writes_a_loadable_bundle(decoder_dirs, tmp_path) -> None:
    """A bundle split from an analysis of the prompt's prefill (an empty KV cache,
    past_sequence_length=0, which ModelGraph accepts) must load again.

    Fails today: the manifest records dims {"past_sequence_length": 0} and
    Manifest.from_dict refuses any dim that is not > 0, so write_bundle writes a bundle that
    load_bundle (device and server) cannot read.
    """
    model = decoder_dirs["llama"] / "model.onnx"
    prefill = DecoderAnalysis.of(model).prefill
    assert prefill.graph.dims["past_sequence_length"] == 0
    bundle = split_decoder(model, tmp_path / "b", head_layers=2, analysis=prefill)
    assert bundle.manifest.verification["generation"]["exact"] is True
    load_bundle(bundle.path)


# -- refusals --------------------------------------------------------------------------------------


def _plain_model(path: Path) -> Path:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="layers.0/relu"),
        helper.make_node("Sigmoid", ["a"], ["y"], name="layers.1/sigmoid"),
    ]
    graph = helper.make_graph(
        nodes,
        "plain",
        [helper.make_tensor_value_info("x", F, [1, 4])],
        [helper.make_tensor_value_info("y", F, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def test_a_model_without_kv_cache_is_not_a_decoder(tmp_path: Path) -> None:
    path = _plain_model(tmp_path / "plain.onnx")
    with pytest.raises(GraphError, match="not a decoder"):
        split_decoder(path, tmp_path / "out", head_layers=1)
    with pytest.raises(GraphError, match="not a decoder"):
        split_decoder(path, tmp_path / "out", head_layers=None)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_state_without_decoder_roles_is_not_a_decoder(tmp_path: Path) -> None:
    """KV-cache naming alone is not enough: no input_ids / logits."""
    path = tmp_path / "state.onnx"
    path.write_bytes(_state_toy().SerializeToString())
    with pytest.raises(GraphError, match="not a decoder"):
        split_decoder(path, tmp_path / "out", head_layers=1)
    with pytest.raises(GraphError):
        DecoderAnalysis.of(path)


@pytest.mark.parametrize("head_layers", [NUM_LAYERS + 1, 99, -1])
def test_bad_head_layers_is_a_usage_error(decoder_dirs, analyses, tmp_path, head_layers) -> None:
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="head-layers") as info:
        split_decoder(
            decoder_dirs["llama"] / "model.onnx",
            out,
            head_layers=head_layers,
            analysis=analyses["llama"],
        )
    assert "0, 1, 2, 3, 4" in info.value.message
    assert not (out / "manifest.json").exists()


# -- symbolic dims that are sums ------------------------------------------------------------------


def test_resolve_dim_with_sums_and_unknown_names() -> None:
    dims = {"past_sequence_length": 7, "sequence_length": 3, "batch_size": 1}
    assert resolve_dim(5, {}) == 5
    assert resolve_dim("sequence_length", dims) == 3
    assert resolve_dim("past_sequence_length + sequence_length", dims) == 10
    assert resolve_dim("past_sequence_length+sequence_length", dims) == 10
    assert resolve_dim("past_sequence_length + 1", dims) == 8
    assert resolve_dim("2 + past_sequence_length + sequence_length", dims) == 12
    assert resolve_dim("past_sequence_length + 0", {"past_sequence_length": 0}) == 0
    assert resolve_dim("unknown", dims) is None
    assert resolve_dim("past_sequence_length + unknown", dims) is None
    assert resolve_dim("past_sequence_length + ", dims) is None
    assert resolve_dim("past_sequence_length - 1", dims) is None  # only sums are understood
    # A name given whole wins over its terms.
    assert resolve_dim("a + b", {"a + b": 4}) == 4
    assert dim_terms("past_sequence_length + sequence_length") == [
        "past_sequence_length",
        "sequence_length",
    ]
    assert dim_terms("n") == ["n"]
    spec = TensorSpec("attention_mask", "int64", ("batch_size", "past_sequence_length + 1"))
    assert spec.resolved(dims) == (1, 8)
    assert spec.nbytes(dims) == 64
    assert spec.nbytes({"batch_size": 1}) is None


def _sum_dim_model() -> Any:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    graph = helper.make_graph(
        nodes,
        "sum-dims",
        [helper.make_tensor_value_info("x", F, ["batch", "past + seq"])],
        [helper.make_tensor_value_info("y", F, ["batch", "past + seq"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_graph_dims_are_the_terms_of_sums() -> None:
    graph = load_model(_sum_dim_model()).graph(dims={"past": 0, "seq": 3})
    assert graph.input_shapes() == {"x": (1, 3)}
    assert load_model(_sum_dim_model()).graph(dims={"past": 2, "seq": 3}).input_shapes() == {
        "x": (1, 5)
    }
    with pytest.raises(GraphError, match="no graph input has such a dimension"):
        load_model(_sum_dim_model()).graph(dims={"sequence": 3})
    with pytest.raises(GraphError, match=">= 0"):
        load_model(_sum_dim_model()).graph(dims={"past": -1, "seq": 3})


def test_a_missing_term_of_a_sum_dim_is_named_in_the_hint() -> None:
    """The hint must name the dim the user can give (``--dim past=N``), not the sum.

    Fails today: ModelGraph.input_shapes lists the whole symbolic dim, so the hint reads
    ``--dim past + seq=N``, which --dim then rejects (no input has a dim of that name).
    """
    graph = load_model(_sum_dim_model()).graph(dims={"seq": 3})
    with pytest.raises(GraphError, match="symbolic dim") as info:
        graph.input_shapes()
    assert info.value.hint == "--dim past=N gives their values"


# -- tied weights aliased through Identity / Transpose / Cast --------------------------------------


def _view_nodes(chain: tuple[str, ...]) -> tuple[list[onnx.NodeProto], str]:
    """Nodes turning initializer W [4, 4] into a weight view ``Wv`` through ``chain``."""
    nodes = []
    src = "W"
    for i, op in enumerate(chain):
        out = "Wv" if i == len(chain) - 1 else f"W_{i}"
        attrs: dict[str, Any] = {}
        if op == "Transpose":
            attrs["perm"] = [1, 0]
        if op == "Cast":
            attrs["to"] = F
        nodes.append(helper.make_node(op, [src], [out], name=f"tied/{op.lower()}_{i}", **attrs))
        src = out
    return nodes, "Wv"


def _tied_model(chain: tuple[str, ...]) -> Any:
    """embed: x @ Wv -> h1 -> relu -> ... -> lm_head: h3 @ Wv -> y. ``Wv`` is read by the first
    and the last compute node, so every interior cut has it on both sides."""
    views, wv = _view_nodes(chain)
    nodes = [
        *views,
        helper.make_node("MatMul", ["x", wv], ["h1"], name="embed/matmul"),
        helper.make_node("Relu", ["h1"], ["h2"], name="block.0/relu"),
        helper.make_node("Sigmoid", ["h2"], ["h3"], name="block.1/sigmoid"),
        helper.make_node("MatMul", ["h3", wv], ["y"], name="lm_head/matmul"),
    ]
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W")
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("x", F, [2, 4])],
        [helper.make_tensor_value_info("y", F, [2, 4])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize(
    "chain",
    [("Identity",), ("Transpose",), ("Cast",), ("Identity", "Transpose"), ("Cast", "Identity")],
)
def test_weight_views_are_weights_of_both_sides(chain: tuple[str, ...]) -> None:
    assert set(chain) <= WEIGHT_VIEW_OPS
    model = _tied_model(chain)
    graph = load_model(model).graph()
    assert [n.op_type for n in graph.nodes] == ["MatMul", "Relu", "Sigmoid", "MatMul"]
    assert graph.initializers["Wv"] == 64  # the view weighs what it aliases
    cuts = graph.cuts()
    assert [c.index for c in cuts] == [0, 1, 2, 3, 4]
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    full = make_session(model, optimize=False)
    expected = run(full, {"x": x})["y"]
    for cut in cuts:
        names = {t.name for t in cut.tensors}
        assert not names & {"W", "Wv", *(f"W_{i}" for i in range(len(chain)))}, cut.id
        if 0 < cut.index < 4:
            assert len(cut.tensors) == 1 and cut.nbytes == 2 * 4 * 4
        head, tail = graph.split(cut)
        values: dict[str, np.ndarray] = {"x": x}
        for part in (head, tail):
            if part is None:
                continue
            onnx.checker.check_model(part, full_check=True)
            # Each part carries the weight and its view chain itself.
            assert "W" in [t.name for t in part.graph.initializer]
            assert [n.op_type for n in part.graph.node][: len(chain)] == list(chain)
            values.update(run(make_session(part, optimize=False), values))
        np.testing.assert_array_equal(values["y"], expected)
    # The view is the weight the head holds from its first reader on (W alone is never read).
    assert [c.head_weight_bytes for c in cuts] == [0, 64, 64, 64, 64]


def test_a_view_of_an_activation_is_not_a_weight() -> None:
    """Transpose of a graph input is computed: it is a node and may cross."""
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], name="a/transpose", perm=[1, 0]),
        helper.make_node("Relu", ["xt"], ["r"], name="b/relu"),
        helper.make_node("Add", ["r", "xt"], ["y"], name="c/add"),
    ]
    graph_proto = helper.make_graph(
        nodes,
        "activation-view",
        [helper.make_tensor_value_info("x", F, [2, 3])],
        [helper.make_tensor_value_info("y", F, [3, 2])],
    )
    model = helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    graph = load_model(model).graph()
    assert [n.op_type for n in graph.nodes] == ["Transpose", "Relu", "Add"]
    cut = next(c for c in graph.cuts() if c.index == 2)
    assert {t.name for t in cut.tensors} == {"xt", "r"}


# -- splitter: extra files and the generation check ------------------------------------------------


def test_split_model_refuses_extra_files_outside_the_bundle(analyses, tmp_path) -> None:
    """``extra_files`` names are bundle-relative; one that climbs out must be refused before
    anything is written.

    Fails today: split_model copies the file to ``out_dir / rel`` (here next to the bundle
    folder), records it, and writes a manifest that load_bundle then refuses.
    """
    from edgeoffload.errors import EdgeOffloadError
    from edgeoffload.split.splitter import split_model

    analysis = analyses["llama"]
    src = tmp_path / "src.txt"
    src.write_text("not a tokenizer")
    out = tmp_path / "out"
    with pytest.raises(EdgeOffloadError, match="escaped"):
        split_model(analysis, block_cuts(analysis)[2], out, extra_files={"../escaped.txt": src})
    assert not (tmp_path / "escaped.txt").exists()
    assert not (out / "manifest.json").exists()


def test_verify_generation_catches_a_tail_that_differs(analyses) -> None:
    """The generation check is not vacuous: a tail whose norm weights were scaled fails it."""
    from edgeoffload.errors import VerificationError
    from edgeoffload.split.verify import verify_generation

    analysis = analyses["llama"]
    graph = analysis.graph
    head, tail = graph.split(block_cuts(analysis)[2])
    assert head is not None and tail is not None
    assert verify_generation(graph, head, tail)["exact"] is True
    norms = [t for t in tail.graph.initializer if list(t.dims) == [64] and t.data_type == F]
    assert norms
    for norm in norms:
        norm.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(norm) * 1.5, norm.name))
    with pytest.raises(VerificationError, match="differ"):
        verify_generation(graph, head, tail)
