"""What a call through a Ray Serve deployment handle costs beside direct onnxruntime.

Usage:  unshare -n sh -c 'ip link set lo up && python benchmarks/ray_overhead.py [--calls 300]'

Ray binds every interface it finds, so it runs in a network namespace of its own (only the
loopback there); the script refuses to run with other interfaces. A tiny tail (one MatMul and
a Relu on a [1, 64] float32 tensor: microseconds of compute) is deployed with the edge server's
executor (:class:`edgeoffload.edge.rayexec.RayTailExecutor`, a Ray started in this process, one
replica) and called ``--calls`` times in a row, one at a time, through
``RayTailExecutor.run`` (the handle call, its retry wrapper, serialization to the replica and
back); the baseline is the same model's onnxruntime session called directly here, in the
same run. Prints medians and p90s and writes benchmarks/results/ray_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeoffload._ort import make_session, run
from edgeoffload.edge.rayexec import RayExecutorConfig, RayTailExecutor
from edgeoffload.lab.stats import environment

RESULTS = Path(__file__).resolve().parent / "results"
WIDTH = 64


def tiny_tail() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])
    rng = np.random.default_rng(0)
    w = helper.make_tensor(
        "w", TensorProto.FLOAT, [WIDTH, WIDTH], rng.normal(size=(WIDTH, WIDTH)).astype(np.float32)
    )
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
        "tiny_tail",
        [x],
        [y],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def summary(times_ms: list[float]) -> dict[str, float]:
    ordered = sorted(times_ms)
    return {
        "median_ms": round(statistics.median(ordered), 4),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 4),
        "min_ms": round(ordered[0], 4),
    }


async def measure(path: Path, calls: int, warmup: int) -> dict[str, object]:
    feed = {"x": np.random.default_rng(1).normal(size=(1, WIDTH)).astype(np.float32)}
    session = make_session(path)
    expected = run(session, feed)["y"]
    executor = RayTailExecutor(RayExecutorConfig(replicas=1, cpus_per_replica=1.0))
    started = time.monotonic()
    await executor.start()
    executor.add("tiny", path)
    await executor.wait_ready()
    ready_s = time.monotonic() - started
    try:
        direct: list[float] = []
        through_ray: list[float] = []
        for i in range(warmup + calls):
            # Interleaved, so that drift on a shared machine hits both alike.
            t = time.perf_counter()
            run(session, feed)
            d = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            got = await executor.run("tiny", feed)
            r = (time.perf_counter() - t) * 1e3
            np.testing.assert_allclose(got["y"], expected, rtol=1e-6, atol=1e-6)
            if i >= warmup:
                direct.append(d)
                through_ray.append(r)
    finally:
        await executor.stop()
    ray_s, direct_s = summary(through_ray), summary(direct)
    return {
        "calls": calls,
        "warmup": warmup,
        "ready_s": round(ready_s, 2),
        "direct_ort": direct_s,
        "ray_handle": ray_s,
        "overhead_median_ms": round(ray_s["median_ms"] - direct_s["median_ms"], 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("-o", "--output", type=Path, default=RESULTS / "ray_overhead.json")
    args = parser.parse_args()
    if [name for _, name in socket.if_nameindex()] != ["lo"]:
        print(
            "refusing to run: Ray binds every interface; run in a network namespace:\n"
            "  unshare -n sh -c 'ip link set lo up && python benchmarks/ray_overhead.py'",
            file=sys.stderr,
        )
        return 3
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tail.onnx"
        onnx.save(tiny_tail(), path)
        result = asyncio.run(measure(path, args.calls, args.warmup))
    result = {
        "benchmark": "ray-overhead",
        "command": " ".join(["python", *sys.argv]),
        "model": f"MatMul + Relu on [1, {WIDTH}] float32 (one replica, one CPU)",
        **result,
        "environment": environment().to_dict(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    d, r = result["direct_ort"], result["ray_handle"]
    print(f"{args.calls} calls, one at a time (replica ready after {result['ready_s']} s):")
    print(f"  direct ORT       median {d['median_ms']:.3f} ms  p90 {d['p90_ms']:.3f} ms")
    print(f"  Ray Serve handle median {r['median_ms']:.3f} ms  p90 {r['p90_ms']:.3f} ms")
    print(f"  per-call overhead (median): {result['overhead_median_ms']:.3f} ms")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
