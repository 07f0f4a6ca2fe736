"""The Ray Serve executor on a two-node cluster, run by tests/test_ray_executor.py inside its
own network namespace.

``unshare -n python tests/_ray_netns.py BUNDLE MODEL.onnx INPUTS.npz WORKDIR`` gives this
process a namespace that holds only a loopback interface (Ray binds every interface it finds:
here it finds only ``lo``); the script refuses to run anywhere else. It turns ``lo`` on and
starts a two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head and one
worker node, one CPU each), then an :class:`EdgeServer` with the Ray executor and two
replicas of the bundle's tail, at most one per node (so one on each). Real devices
(:class:`OffloadClient`, real keys, Noise over websockets, no client retries) send requests;
every answer is compared with the unsplit model run by onnxruntime here.

Phase 1 sends until both nodes have answered (bounded). Phase 2 removes the worker node while
the devices keep sending a fixed number of requests: each must still be answered, correctly,
by the surviving replica (the executor sends a request whose replica was lost again).

stdout carries one JSON object (the report); Ray's and the server's logs go to stderr.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeoffload._ort import make_session, run
from edgeoffload.bundle import load_bundle
from edgeoffload.device.client import OffloadClient
from edgeoffload.edge.allowlist import AllowList
from edgeoffload.edge.rayexec import app_name
from edgeoffload.edge.server import EdgeServer, ServerConfig
from edgeoffload.lab.harness import ThrowawayKeys

DEVICES = 3
PHASE1_MAX = 60  # requests, at most, until both nodes have answered
PHASE2_PER_DEVICE = 8  # requests each device sends while the worker node goes away
REMOVE_AFTER = 4  # phase-2 answers before the worker node is removed
SCENARIO_S = 100.0
# The tail on a replica (maybe batched) against the unsplit model here: other kernels and
# blockings for other shapes, nothing more.
RTOL, ATOL = 1e-4, 1e-5


def _only_loopback() -> bool:
    # if_nameindex asks the kernel about this process's namespace (unlike /sys/class/net).
    return [name for _, name in socket.if_nameindex()] == ["lo"]


class Checker:
    """Inputs for request ``i`` and the unsplit model's answer to them."""

    def __init__(self, model: Path, sample: dict[str, np.ndarray]) -> None:
        self.session = make_session(model)
        self.sample = sample
        self.worst = 0.0
        self.wrong: list[str] = []

    def inputs(self, i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(i)
        return {
            n: (a + rng.normal(scale=0.5, size=a.shape)).astype(a.dtype)
            for n, a in self.sample.items()
        }

    def check(self, i: int, got: dict[str, np.ndarray]) -> None:
        want = run(self.session, self.inputs(i))
        try:
            assert sorted(got) == sorted(want), f"outputs {sorted(got)} != {sorted(want)}"
            for name in want:
                np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL)
                self.worst = max(self.worst, float(np.max(np.abs(got[name] - want[name]))))
        except AssertionError as exc:
            self.wrong.append(f"request {i}: {str(exc).strip().splitlines()[0]}")


async def scenario(
    cluster: Any, worker: Any, bundle_dir: Path, model: Path, inputs_file: Path, workdir: Path
) -> dict:
    bundle = load_bundle(bundle_dir)
    with np.load(inputs_file) as data:
        checker = Checker(model, {name: data[name] for name in data.files})
    keys = ThrowawayKeys.create(workdir / "keys", devices=[f"d{i}" for i in range(DEVICES)])
    report: dict[str, Any] = {}
    t0 = time.monotonic()
    nodes = {cluster.head_node.node_id: "head", worker.node_id: "worker"}
    server = EdgeServer(
        [bundle],
        identity=keys.server,
        allow=AllowList(keys.allow_file),
        config=ServerConfig(
            port=0,
            workers=4,
            executor="ray",
            ray_address=cluster.address,
            ray_replicas=2,
            ray_cpus_per_replica=0.5,
            ray_max_replicas_per_node=1,  # two replicas, two nodes: one on each
            batch_max=4,  # @serve.batch on the replicas
            batch_delay_ms=2.0,
        ),
    )
    try:
        await server.start()
        report["ready_s"] = round(time.monotonic() - t0, 1)
        executor = server.ray_executor
        assert executor is not None
        url = f"ws://127.0.0.1:{server.port}"
        clients = [
            OffloadClient(
                bundle,
                server=url,
                server_key=keys.server.public,
                identity=key,
                fallback="error",  # an answer from the server, or a failure: never local
                retries=0,  # a lost request is not hidden by the device trying again
                timeout=30.0,
            )
            for key in keys.devices.values()
        ]
        for c in clients:
            await c.connect()
        answered: list[int] = []
        attempts: list[int] = []

        async def send(client: OffloadClient, i: int) -> None:
            got = await client.run(checker.inputs(i))
            assert client.last_timing is not None
            attempts.append(client.last_timing.attempts)
            checker.check(i, got)
            answered.append(i)

        # Phase 1: every device in turn, until both nodes have served (bounded).
        i = 0
        while i < PHASE1_MAX and len(executor.served_by) < 2:
            await asyncio.gather(*(send(c, i + k) for k, c in enumerate(clients)))
            i += len(clients)
        report["phase1_requests"] = i
        report["served_by_before"] = {nodes.get(n, n): k for n, k in executor.served_by.items()}

        # Phase 2: devices keep sending while the worker node is removed.
        removed = asyncio.Event()
        base = 1000
        phase2_before = len(answered)

        async def device_loop(d: int, client: OffloadClient) -> None:
            for k in range(PHASE2_PER_DEVICE):
                await send(client, base + d * PHASE2_PER_DEVICE + k)

        async def remover() -> None:
            deadline = time.monotonic() + 30.0
            while len(answered) - phase2_before < REMOVE_AFTER and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            await asyncio.to_thread(cluster.remove_node, worker)
            report["removed_after"] = len(answered) - phase2_before
            removed.set()

        before_removal = dict(executor.served_by)
        results = await asyncio.gather(
            remover(),
            *(device_loop(d, c) for d, c in enumerate(clients)),
            return_exceptions=True,
        )
        report["phase2_errors"] = [f"{type(r).__name__}: {r}" for r in results if r is not None]
        report["phase2_requests"] = DEVICES * PHASE2_PER_DEVICE
        report["phase2_answered"] = len(answered) - phase2_before
        report["served_by_after"] = {nodes.get(n, n): k for n, k in executor.served_by.items()}
        report["served_in_phase2"] = {
            nodes.get(n, n): k - before_removal.get(n, 0) for n, k in executor.served_by.items()
        }
        report["retries"] = dict(executor.retries)
        report["batch_sizes"] = {str(k): v for k, v in sorted(executor.batch_sizes.items())}
        report["answered"] = len(answered)
        report["unique_answered"] = len(set(answered))
        report["max_device_attempts"] = max(attempts)
        report["wrong"] = checker.wrong[:5]
        report["worst_abs_diff"] = checker.worst
        report["server_results"] = server.stats.results
        report["server_errors"] = dict(server.stats.errors)
        for c in clients:
            await c.close()

        # Unloading the version deletes its Serve application (in the background).
        from ray import serve

        name = app_name(bundle.manifest.version)
        report["app_before_unload"] = name in serve.status().applications
        server.remove_bundle(bundle.manifest.version)
        deadline = time.monotonic() + 30.0
        while name in serve.status().applications and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        report["app_after_unload"] = name in serve.status().applications
    finally:
        await server.shutdown()
    report["total_s"] = round(time.monotonic() - t0, 1)
    return report


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    if not _only_loopback():
        print("refusing to run: not in a fresh network namespace (unshare -n)", file=sys.stderr)
        return 3
    # Ray's processes inherit fd 1: the report gets its own copy, everything else stderr.
    report_fd = os.dup(1)
    os.dup2(2, 1)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)
    bundle_dir, model, inputs_file, workdir = (Path(a) for a in argv)
    from ray.cluster_utils import Cluster

    # On the main thread: Ray's nodes install signal handlers.
    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        cluster_s = round(time.monotonic() - t0, 1)
        report = asyncio.run(
            asyncio.wait_for(
                scenario(cluster, worker, bundle_dir, model, inputs_file, workdir), SCENARIO_S
            )
        )
        report["cluster_s"] = cluster_s
    finally:
        cluster.shutdown()
    with os.fdopen(report_fd, "w") as out:
        out.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
