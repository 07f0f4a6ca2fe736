"""Per-request overhead of the TypeScript client against the Python client, same server, same run.

Usage:  python benchmarks/ts_client.py [--requests 300] [--kib 256] [--output results.json]

A two-node model (``Relu`` on the device, ``ReduceMean`` on the server) whose cut carries one
float32 tensor of ``--kib`` KiB (codec ``none``): the head and the tail cost microseconds, so a
request's time is the client's own work (encode, encrypt, send, receive, decrypt, decode) plus
loopback and the server. One ``edgeoffload serve`` process on 127.0.0.1; the Python client
(``BlockingOffloadClient``) and the TS client (Node, ``mobile_bridge/ts``, its head in
onnxruntime-node) each send ``--requests`` requests after 20 warm-up ones, in alternating
rounds so that both see the same machine. Prints a table of median / p90 total ms and the
median of each part of the breakdown; ``--output`` also writes JSON with the machine.

Needs ``npm ci`` in mobile_bridge/ts.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeoffload.device.blocking import BlockingOffloadClient
from edgeoffload.keys import encode_public
from edgeoffload.lab import tsclient
from edgeoffload.lab.harness import ThrowawayKeys, spawn_server
from edgeoffload.split.analysis import Analysis
from edgeoffload.split.splitter import split_model

ROUNDS = 5
WARMUP = 20
PARTS = ("headMs", "encodeMs", "networkMs", "serverMs", "decodeMs")
PY_PARTS = ("head_ms", "encode_ms", "network_ms", "server_ms", "decode_ms")


def probe_model(elements: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, elements])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])
    nodes = [
        helper.make_node("Relu", ["x"], ["h"], name="head/relu"),
        helper.make_node("ReduceMean", ["h"], ["y"], name="tail/mean", keepdims=1, axes=[1]),
    ]
    graph = helper.make_graph(nodes, "probe", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def summary(totals: list[float], parts: dict[str, list[float]]) -> dict[str, float]:
    ordered = sorted(totals)
    out = {
        "median_ms": statistics.median(ordered),
        "p90_ms": ordered[int(0.9 * (len(ordered) - 1))],
    }
    out.update({name: statistics.median(values) for name, values in parts.items()})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--kib", type=int, default=256)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    reason = tsclient.ts_ready()
    if reason is not None:
        print(f"ts_client: {reason}", file=sys.stderr)
        return 2
    tsclient.build()
    elements = args.kib * 1024 // 4
    per_round = max(1, args.requests // ROUNDS)
    with tempfile.TemporaryDirectory(prefix="ts-bench-") as tmp:
        root = Path(tmp)
        analysis = Analysis.of(probe_model(elements))
        cut = next(c for c in analysis.cuts if [t.name for t in c.tensors] == ["h"])
        bundle = split_model(analysis, cut, root / "bundle", codec="none").path
        keys = ThrowawayKeys.create(root / "keys")
        inputs = {"x": np.random.default_rng(0).standard_normal((1, elements), dtype=np.float32)}
        py_totals: list[float] = []
        py_parts: dict[str, list[float]] = {p: [] for p in PARTS}
        ts_totals: list[float] = []
        ts_parts: dict[str, list[float]] = {p: [] for p in PARTS}
        wire = {}
        with (
            spawn_server([bundle], keys, workers=1) as server,
            BlockingOffloadClient(
                bundle,
                server=server.url,
                server_key=keys.server.public,
                identity=keys.device,
                fallback="error",
            ) as client,
        ):
            for _ in range(WARMUP):
                client.run(inputs)
            for r in range(ROUNDS):
                for _ in range(per_round):
                    client.run(inputs)
                    t = client.last_timing
                    assert t is not None and t.offloaded
                    py_totals.append(t.total_ms)
                    for ts_name, py_name in zip(PARTS, PY_PARTS, strict=True):
                        py_parts[ts_name].append(getattr(t, py_name))
                    wire["python"] = t.wire_bytes
                case = tsclient.TsCase(
                    f"round{r}",
                    bundle,
                    server.url,
                    encode_public(keys.server.public),
                    inputs,
                    repeat=WARMUP + per_round,
                )
                (result,) = tsclient.run_cases(
                    [case], keys.device_dir() / "private.key", root / f"ts{r}"
                )
                if not result.ok:
                    raise SystemExit(
                        f"TS client failed: {result.error_type}: {result.error_message}"
                    )
                for timing in result.timings[WARMUP:]:
                    assert timing["offloaded"]
                    ts_totals.append(timing["totalMs"])
                    for name in PARTS:
                        ts_parts[name].append(timing[name])
                    wire["ts"] = timing["wireBytes"]
    rows = {"python": summary(py_totals, py_parts), "ts": summary(ts_totals, ts_parts)}
    print(
        f"{args.kib} KiB crossing (float32, codec none), loopback, "
        f"{len(py_totals)} requests per client"
    )
    header = f"{'client':8} {'median':>8} {'p90':>8} " + " ".join(f"{p[:-2]:>8}" for p in PARTS)
    print(header + f" {'wire B':>8}")
    for name, row in rows.items():
        cells = " ".join(f"{row[p]:8.3f}" for p in PARTS)
        print(f"{name:8} {row['median_ms']:8.3f} {row['p90_ms']:8.3f} {cells} {wire[name]:>8}")
    ratio = rows["ts"]["median_ms"] / rows["python"]["median_ms"]
    print(f"TS / Python median total: {ratio:.2f}x")
    if args.output:
        args.output.write_text(
            json.dumps(
                {
                    "benchmark": "ts_client",
                    "kib": args.kib,
                    "requests": len(py_totals),
                    "rows": rows,
                    "wire_bytes": wire,
                    "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
