"""The command line on decoder LLMs: split (export folder and Hugging Face folder), inspect,
chat against a real `edgeoffload serve` process, and `bench generate`.

`split`, `inspect` and `bench` run in-process through ``main(argv) -> int``; the edge server
and `chat` run as separate processes (``python -m edgeoffload.cli``) talking over a real
websocket on 127.0.0.1 with real Noise keys. The oracle for chat replies is the unsplit tiny
Llama run here in onnxruntime with its whole KV cache (greedy, stopping before end-of-sequence,
as the device does), decoded with the bundle's own tokenizer. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper

from edgeoffload._ort import make_session
from edgeoffload.bundle import load_bundle
from edgeoffload.cli import main
from edgeoffload.core.decoder import DecoderLayout, KVState, select_next
from edgeoffload.device.tokenizer import TextTokenizer
from edgeoffload.lab.harness import ThrowawayKeys, spawn_server

CHAT_TIMEOUT = 120.0  # seconds: bound on one chat subprocess
SERVER_CONTEXT = 64  # --max-context of the edge server process
STATS = re.compile(
    r"(\d+) tokens, TTFT \d+ ms, [\d.]+ tokens/s, (\d+|None) B/token up, finish (\w+)(.*)"
)
WORKLOAD = ("--prompt-tokens", "16", "--new-tokens", "8")


def _run(*argv: str) -> tuple[int, str, str]:
    """``main(argv)`` with stdout/stderr captured (usable in module-scoped fixtures too)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _assert_one_line_error(err: str, code: int, expected: int) -> str:
    assert code == expected, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("edgeoffload: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _check_plans(report: dict[str, Any], layers: int = 4) -> None:
    assert report["workload"] == {"prompt_tokens": 16, "new_tokens": 8}
    plans = report["plans"]
    assert [p["head_layers"] for p in plans] == [*range(layers + 1), None]
    for plan in plans:
        assert plan["ttft_ms"] > 0 and plan["tpot_ms"] > 0
        assert plan["total_ms"] == pytest.approx(
            plan["ttft_ms"] + 7 * plan["tpot_ms"], abs=5e-3
        )  # each value rounded to 1e-3
        assert plan["device_memory_bytes"] >= plan["kv_device_bytes"] >= 0
    assert report["best"] in plans


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auto_split(tiny_llama_dir, tmp_path_factory) -> SimpleNamespace:
    """`split EXPORT_DIR --json`: the cost model chooses the cut."""
    out = tmp_path_factory.mktemp("cli-auto") / "bundle"
    code, stdout, stderr = _run(
        "split", str(tiny_llama_dir), "-o", str(out), "--json", "--network", "wifi", *WORKLOAD
    )
    assert code == 0, stderr
    return SimpleNamespace(path=out, data=json.loads(stdout), stderr=stderr)


@pytest.fixture(scope="module")
def forced_split(tiny_llama_dir, tmp_path_factory) -> SimpleNamespace:
    """`split EXPORT_DIR --head-layers 2` with the human-readable table."""
    out = tmp_path_factory.mktemp("cli-forced") / "bundle"
    code, stdout, stderr = _run(
        "split", str(tiny_llama_dir), "-o", str(out), "--head-layers", "2", *WORKLOAD
    )
    assert code == 0, stderr
    return SimpleNamespace(path=out, stdout=stdout, stderr=stderr)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> SimpleNamespace:
    keys = ThrowawayKeys.create(tmp_path_factory.mktemp("cli-llm-keys"), devices=("chat-device",))
    return SimpleNamespace(
        throwaway=keys, server=keys.server_dir, device=keys.device_dir(), allow=keys.allow_file
    )


@pytest.fixture(scope="module")
def server(forced_split, keys) -> Any:
    """`edgeoffload serve BUNDLE` in its own process, shared by the chat tests."""
    spawned = spawn_server(
        [forced_split.path],
        keys.throwaway,
        extra_args=[
            "--kv-budget",
            "64MiB",
            "--session-ttl",
            "60",
            "--max-context",
            str(SERVER_CONTEXT),
            "--workers",
            "1",
        ],
        timeout=60.0,
    )
    proc = spawned.process
    yield SimpleNamespace(proc=proc, url=spawned.url)
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class Oracle:
    """The unsplit model with its whole KV cache: the reply a chat turn must print."""

    def __init__(self, model: Path, bundle: Path) -> None:
        manifest = load_bundle(bundle).manifest
        state = {e["input"]: e["output"] for e in manifest.state}
        self.layout = DecoderLayout.of(manifest.graph_inputs, manifest.graph_outputs, state)
        self.session = make_session(model, threads=1)
        self.tokenizer = TextTokenizer.from_dir(bundle / "tokenizer")

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def reply(self, messages: list[dict[str, str]], max_new: int, context: int) -> tuple[str, int]:
        """(text, generated tokens) of a greedy reply within ``context`` positions."""
        prompt = self.prompt(messages)
        kv = KVState(self.layout.state, {s.name: s for s in self.layout.state_specs})
        feed, out = list(prompt), []
        while len(out) < max_new:
            outputs = kv.run(self.session, self.layout.token_feed(feed, kv.length), len(feed))
            token = int(np.argmax(select_next(outputs[self.layout.logits])))
            if token in self.tokenizer.eos_token_ids:
                break
            out.append(token)
            if kv.length + 1 > context:
                break
            feed = [token]
        return self.tokenizer.decode(out), len(out)


@pytest.fixture(scope="module")
def oracle(tiny_llama_dir, forced_split) -> Oracle:
    return Oracle(tiny_llama_dir / "model.onnx", forced_split.path)


def _chat(
    bundle: Path, url: str, keys: SimpleNamespace, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "edgeoffload.cli",
        "chat",
        str(bundle),
        "--server",
        url,
        "--server-key",
        str(keys.server),
        "--key",
        str(keys.device),
        *args,
    ]
    return subprocess.run(
        cmd,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=CHAT_TIMEOUT,
    )


def _stats(stderr: str) -> list[re.Match[str]]:
    return [m for line in stderr.splitlines() if (m := STATS.search(line))]


# -- split -------------------------------------------------------------------------------------


def test_split_export_folder_json(auto_split) -> None:
    data = auto_split.data
    assert Path(data["bundle"]) == auto_split.path
    _check_plans(data["report"])
    chosen = data["chosen"]
    assert chosen == data["report"]["best"]  # nothing forced: the cost model's choice
    assert data["verification"]["generation"]["exact"] is True
    bundle = load_bundle(auto_split.path)
    m = bundle.manifest
    assert m.cut_id == chosen["cut"]
    assert m.codec == "none"  # decoders never get a lossy codec by default
    assert m.predicted["best"]["cut"] == chosen["cut"]
    assert {"tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"} <= set(m.files)
    assert len(m.state) == 8


def test_split_with_head_layers_prints_the_table(forced_split) -> None:
    out = forced_split.stdout
    assert "cut forced with --head-layers 2" in forced_split.stderr
    assert "chose 2 blocks on the device" in out
    assert "verified: greedy decoding through the split matches the full model" in out
    assert "bit-exact" in out
    for label in ("all-remote", "2 blocks on the device", "all-local"):
        assert label in out
    m = load_bundle(forced_split.path).manifest
    sides = {e["input"]: e["side"] for e in m.state}
    for name, side in sides.items():
        layer = int(name.split(".")[1])
        assert side == ("device" if layer < 2 else "server"), name
    assert m.verification["generation"]["exact"] is True


def test_split_hugging_face_folder(tiny_llama_dir, tmp_path, monkeypatch) -> None:
    """A Hugging Face folder is exported (with past key values) into the cache first."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEOFFLOAD_CACHE", str(cache))
    hf = tiny_llama_dir.parent / "hf"
    assert (hf / "config.json").is_file() and not (hf / "model.onnx").exists()
    out = tmp_path / "bundle"
    code, stdout, stderr = _run(
        "split", str(hf), "-o", str(out), "--json", "--head-layers", "1", *WORKLOAD
    )
    assert code == 0, stderr
    data = json.loads(stdout)
    _check_plans(data["report"])
    assert data["chosen"]["head_layers"] == 1
    assert data["verification"]["generation"]["exact"] is True
    exports = list(cache.glob("export-hf-*/model.onnx"))
    assert len(exports) == 1, list(cache.iterdir())
    m = load_bundle(out).manifest
    assert m.cut_id == data["chosen"]["cut"]
    assert [e["side"] for e in m.state].count("device") == 2
    # The tokenizer travels from the Hugging Face folder through the export into the bundle.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / "tokenizer" / name).read_bytes() == (hf / name).read_bytes()


def test_cut_on_a_decoder_is_a_usage_error(tiny_llama_dir, tmp_path) -> None:
    code, _, err = _run("split", str(tiny_llama_dir), "-o", str(tmp_path / "b"), "--cut", "c5")
    line = _assert_one_line_error(err, code, 2)
    assert "--head-layers" in line
    assert not (tmp_path / "b").exists()


def test_head_layers_out_of_range_is_a_usage_error(tiny_llama_dir, tmp_path) -> None:
    code, _, err = _run(
        "split", str(tiny_llama_dir), "-o", str(tmp_path / "b"), "--head-layers", "9", *WORKLOAD
    )
    line = _assert_one_line_error(err, code, 2)
    assert "--head-layers 9" in line and "[0, 1, 2, 3, 4]" in line
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_head_layers_on_a_non_decoder_is_a_usage_error(tmp_path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "plain.onnx"
    path.write_bytes(model.SerializeToString())
    code, _, err = _run("split", str(path), "-o", str(tmp_path / "b"), "--head-layers", "1")
    line = _assert_one_line_error(err, code, 2)
    assert "decoder" in line


# -- inspect -----------------------------------------------------------------------------------


def test_inspect_a_decoder_bundle(forced_split) -> None:
    code, out, err = _run("inspect", str(forced_split.path))
    assert code == 0, err
    assert "all hashes verified" in out
    head_line = next(line for line in out.splitlines() if line.strip().startswith("head:"))
    tail_line = next(line for line in out.splitlines() if line.strip().startswith("tail:"))
    assert "past_key_values.1.value" in head_line and "past_key_values.2.key" not in head_line
    assert "past_key_values.3.value" in tail_line and "past_key_values.0.key" not in tail_line
    code, out, err = _run("inspect", str(forced_split.path), "--json")
    assert code == 0, err
    manifest = json.loads(out)
    assert len(manifest["state"]) == 8
    assert "tokenizer/tokenizer.json" in manifest["files"]
    assert manifest["verification"]["generation"]["exact"] is True


def test_inspect_refuses_a_tampered_tokenizer(forced_split, tmp_path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(forced_split.path, copy)
    target = copy / "tokenizer" / "tokenizer.json"
    target.write_bytes(target.read_bytes().replace(b'"<|im_end|>"', b'"<|im_END|>"', 1))
    code, _, err = _run("inspect", str(copy))
    line = _assert_one_line_error(err, code, 5)
    assert "tokenizer/tokenizer.json" in line


# -- chat --------------------------------------------------------------------------------------


def test_chat_one_prompt(forced_split, server, keys, oracle) -> None:
    proc = _chat(
        forced_split.path,
        server.url,
        keys,
        "-p",
        "hello",
        "--max-new-tokens",
        "8",
        "--stats",
        "--fallback",
        "error",
    )
    assert proc.returncode == 0, proc.stderr
    expected, count = oracle.reply([{"role": "user", "content": "hello"}], 8, SERVER_CONTEXT)
    assert proc.stdout == expected + "\n"
    (stats,) = _stats(proc.stderr)
    assert int(stats.group(1)) == count
    assert stats.group(3) == ("length" if count == 8 else "eos")
    assert "finished locally" not in stats.group(4)
    assert int(stats.group(2)) > 0  # a step sends a few hundred bytes, not the KV cache


def test_chat_turns_from_stdin(forced_split, server, keys, oracle) -> None:
    proc = _chat(
        forced_split.path,
        server.url,
        keys,
        "--max-new-tokens",
        "6",
        "--stats",
        "--fallback",
        "error",
        stdin="hello\nhow are you?\n",
    )
    assert proc.returncode == 0, proc.stderr
    assert len(_stats(proc.stderr)) == 2
    messages = [{"role": "user", "content": "hello"}]
    first, _ = oracle.reply(messages, 6, SERVER_CONTEXT)
    messages += [
        {"role": "assistant", "content": first},
        {"role": "user", "content": "how are you?"},
    ]
    second, _ = oracle.reply(messages, 6, SERVER_CONTEXT)
    assert proc.stdout == f"{first}\n{second}\n"


def test_chat_stops_at_the_servers_context_limit(forced_split, server, keys, oracle) -> None:
    """The server grants --max-context positions; the reply ends there, cleanly."""
    words = ["edge"]
    while len(oracle.prompt([{"role": "user", "content": " ".join(words)}])) < SERVER_CONTEXT - 4:
        words.append("edge")
    text = " ".join(words)
    prompt_len = len(oracle.prompt([{"role": "user", "content": text}]))
    assert prompt_len < SERVER_CONTEXT
    proc = _chat(
        forced_split.path,
        server.url,
        keys,
        "-p",
        text,
        "--max-new-tokens",
        "32",
        "--stats",
        "--fallback",
        "error",
    )
    assert proc.returncode == 0, proc.stderr
    expected, count = oracle.reply([{"role": "user", "content": text}], 32, SERVER_CONTEXT)
    (stats,) = _stats(proc.stderr)
    assert int(stats.group(1)) == count
    if count == SERVER_CONTEXT - prompt_len + 1:  # no end-of-sequence before the limit
        assert stats.group(3) == "context"
    assert proc.stdout == expected + "\n"


def test_chat_finishes_locally_without_a_server(forced_split, keys, oracle) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = _chat(
        forced_split.path,
        f"ws://127.0.0.1:{port}",
        keys,
        "-p",
        "hello",
        "--max-new-tokens",
        "8",
        "--stats",
        "--timeout",
        "2",
    )
    assert proc.returncode == 0, proc.stderr
    expected, count = oracle.reply([{"role": "user", "content": "hello"}], 8, 10**6)
    assert proc.stdout == expected + "\n"
    (stats,) = _stats(proc.stderr)
    assert int(stats.group(1)) == count
    assert "finished locally" in stats.group(4)


def test_chat_without_fallback_fails_in_one_line(forced_split, keys) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = _chat(
        forced_split.path,
        f"ws://127.0.0.1:{port}",
        keys,
        "-p",
        "hello",
        "--fallback",
        "error",
        "--timeout",
        "2",
    )
    _assert_one_line_error(proc.stderr, proc.returncode, 11)


# -- bench generate ----------------------------------------------------------------------------


def test_bench_generate(tiny_llama_dir, tmp_path) -> None:
    out = tmp_path / "gen.json"
    code, stdout, err = _run(
        "bench",
        "generate",
        "--model",
        str(tiny_llama_dir / "model.onnx"),
        "--head-layers",
        "2",
        "--prompt-tokens",
        "16",
        "--new-tokens",
        "8",
        "--runs",
        "5",
        "-o",
        str(out),
    )
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["benchmark"] == "generate"
    assert result["tokens_identical"] is True
    assert (result["head_layers"], result["layers"]) == (2, 4)
    assert (result["prompt_tokens"], result["new_tokens"]) == (16, 8)
    assert result["network"] == "loopback"
    assert result["bytes_per_token"] > 0
    assert result["prefill_bytes"] > result["bytes_per_token"]
    for side in ("split", "unsplit"):
        assert result[side]["decode_tokens_per_s"]["median"] > 0
        assert result[side]["ttft_ms"]["median"] > 0
    mem = result["memory"]
    assert 0 < mem["device_split_weights_bytes"] < mem["device_unsplit_weights_bytes"]
    assert 0 < mem["device_split_kv_bytes"] < mem["device_unsplit_kv_bytes"]
    assert "tokens identical to the unsplit model: True" in stdout
