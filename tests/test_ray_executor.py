"""The Ray Serve tail executor (edgeoffload.edge.rayexec): its pure parts here, and a
two-node Ray cluster serving real devices, a node of which is removed mid-run.

The pure tests need neither Ray nor a network. The end-to-end test runs tests/_ray_netns.py
under ``unshare -n`` (Ray binds every interface it finds: there it finds only a loopback, never
the machine's interfaces) with a real two-node Ray cluster, real onnxruntime, real websockets
and Noise; it is skipped, saying why, where a network namespace cannot be made (not root) or
Ray is not installed — unless EDGEOFFLOAD_REQUIRE_RAY=1 (CI), which turns the skip into a
failure.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeoffload._ort import make_session, run
from edgeoffload.edge import rayexec
from edgeoffload.edge.batcher import StackedRuns
from edgeoffload.edge.rayexec import (
    RayExecutorConfig,
    RetryPolicy,
    call_with_retries,
    replica_lost,
    run_batch,
)
from edgeoffload.errors import ExecutorError, MissingExtra, UsageError
from edgeoffload.lab.harness import netns_unavailable

HELPER = Path(__file__).with_name("_ray_netns.py")
NETNS_TIMEOUT_S = 150


def _relu_model(lead: str | int = "n") -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [lead, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [lead, 3])
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 3], np.arange(9, dtype=np.float32) - 4)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
        "relu",
        [x],
        [y],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# -- batching on the replica: stack, run once per compatible group, split back -----------------


def test_run_batch_groups_compatible_feeds_and_keeps_the_order() -> None:
    session = make_session(_relu_model())
    rng = np.random.default_rng(1)
    feeds = [
        {"x": rng.normal(size=(2, 3)).astype(np.float32)},
        {"x": rng.normal(size=(1, 3)).astype(np.float64)},  # another dtype: its own group
        {"x": rng.normal(size=(3, 3)).astype(np.float32)},
    ]
    feeds[1]["x"] = feeds[1]["x"].astype(np.float32)  # the same after all: one group
    results = run_batch(StackedRuns(session), feeds)
    assert len(results) == 3
    for feed, got in zip(feeds, results, strict=True):
        np.testing.assert_allclose(got["y"], run(session, feed)["y"], rtol=1e-6, atol=1e-7)


# -- retries: a lost replica is retried, a failing tail is not ---------------------------------


class ActorDiedError(Exception):
    """Named like Ray's: the policy goes by the class names of Ray's exceptions."""


class RayTaskError(Exception):
    pass


def test_replica_loss_is_told_from_a_tail_failure() -> None:
    assert replica_lost(ActorDiedError("node removed"))
    assert not replica_lost(RayTaskError("the tail raised"))
    assert not replica_lost(ValueError())


def test_retry_backoff_doubles_up_to_its_cap() -> None:
    policy = RetryPolicy(attempts=5, backoff_s=0.1, max_backoff_s=0.3)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.3, 0.3]


def _flaky(failures: list[BaseException]):
    calls = []

    async def attempt() -> str:
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return "ok"

    return attempt, calls


def test_a_lost_replica_is_retried_until_an_attempt_succeeds() -> None:
    attempt, calls = _flaky([ActorDiedError(), ActorDiedError()])
    seen: list[BaseException] = []
    policy = RetryPolicy(attempts=3, backoff_s=0.0)
    assert asyncio.run(call_with_retries(attempt, policy=policy, on_retry=seen.append)) == "ok"
    assert len(calls) == 3 and len(seen) == 2


def test_retries_are_bounded_then_a_typed_error() -> None:
    attempt, calls = _flaky([ActorDiedError() for _ in range(5)])
    with pytest.raises(ExecutorError, match="failed 2 time") as info:
        asyncio.run(call_with_retries(attempt, policy=RetryPolicy(attempts=2, backoff_s=0.0)))
    assert len(calls) == 2 and isinstance(info.value.__cause__, ActorDiedError)


def test_a_failing_tail_is_not_retried() -> None:
    attempt, calls = _flaky([RayTaskError("bad input")])
    with pytest.raises(RayTaskError):
        asyncio.run(call_with_retries(attempt, policy=RetryPolicy(attempts=3, backoff_s=0.0)))
    assert len(calls) == 1


# -- configuration and the missing extra -------------------------------------------------------


def test_deployment_options_fixed_or_autoscaling() -> None:
    fixed = RayExecutorConfig(replicas=2, cpus_per_replica=0.5, max_replicas_per_node=1)
    options = fixed.deployment_options()
    assert options["num_replicas"] == 2 and options["max_replicas_per_node"] == 1
    assert options["ray_actor_options"] == {"num_cpus": 0.5}
    scaled = RayExecutorConfig(min_replicas=1, max_replicas=4, batch_max=16, resources={"r": 1})
    options = scaled.deployment_options()
    assert "num_replicas" not in options
    assert options["autoscaling_config"]["max_replicas"] == 4
    assert options["max_ongoing_requests"] == 32  # room for a full batch and one filling
    assert options["ray_actor_options"]["resources"] == {"r": 1}
    for bad in (
        RayExecutorConfig(replicas=0),
        RayExecutorConfig(cpus_per_replica=0),
        RayExecutorConfig(min_replicas=3, max_replicas=2),
    ):
        with pytest.raises(UsageError):
            bad.deployment_options()


def test_without_ray_the_executor_is_a_missing_extra(monkeypatch) -> None:
    # A device install has no ray: an import of it fails (None in sys.modules blocks it).
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingExtra) as info:
        rayexec.RayTailExecutor(RayExecutorConfig())
    assert info.value.exit_code == 12
    assert info.value.hint == "pip install 'edgeoffload[ray]'"


def test_serve_executor_ray_without_ray_exits_12_with_the_hint(tmp_path) -> None:
    # The CLI path end to end, in a child where importing ray fails as on a device install.
    from edgeoffload.lab.harness import ThrowawayKeys
    from edgeoffload.split.analysis import Analysis
    from edgeoffload.split.splitter import split_model

    keys = ThrowawayKeys.create(tmp_path / "keys")
    analysis = Analysis.of(_relu_model(), dims={"n": 1})
    bundle = split_model(analysis, analysis.cuts[1], tmp_path / "bundle", codec="none")
    script = (
        "import sys; sys.modules['ray'] = None\n"
        "from edgeoffload.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = ["serve", str(bundle.path), "--key", str(keys.server_dir), "--allow"]
    args += [str(keys.allow_file), "--port", "0", "--executor", "ray"]
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 12, proc.stderr
    assert "pip install 'edgeoffload[ray]'" in proc.stderr


def test_an_unknown_executor_is_a_usage_error(tmp_path) -> None:
    from edgeoffload.edge.allowlist import AllowList
    from edgeoffload.edge.server import EdgeServer, ServerConfig
    from edgeoffload.lab.harness import ThrowawayKeys

    keys = ThrowawayKeys.create(tmp_path / "keys")
    with pytest.raises(UsageError, match="unknown executor"):
        EdgeServer(
            [],
            identity=keys.server,
            allow=AllowList(keys.allow_file),
            config=ServerConfig(executor="dask"),
        )


def test_the_edge_server_imports_without_ray() -> None:
    script = (
        "import sys; sys.modules['ray'] = None\n"
        "import edgeoffload.edge.server, edgeoffload.edge.rayexec\n"
        "assert 'ray.serve' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# -- end to end: two Ray nodes in a network namespace of our own --------------------------------


def _unavailable() -> str | None:
    if importlib.util.find_spec("ray") is None:
        return "ray is not installed (pip install 'edgeoffload[ray]')"
    return netns_unavailable()


@pytest.fixture(scope="module")
def netns():
    reason = _unavailable()
    if reason:
        if os.environ.get("EDGEOFFLOAD_REQUIRE_RAY") == "1":
            pytest.fail(f"EDGEOFFLOAD_REQUIRE_RAY=1, but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def resnet_bundle(tmp_path_factory):
    """The zoo ResNet split in the middle (its crossing tensors keep the symbolic batch dim),
    the unsplit model, and a sample input."""
    from edgeoffload.split import zoo
    from edgeoffload.split.analysis import Analysis
    from edgeoffload.split.splitter import split_model

    model = zoo.build("resnet")
    analysis = Analysis.of(model)
    interior = [c for c in analysis.cuts if 0 < c.index < len(analysis.graph.nodes)]
    root = tmp_path_factory.mktemp("ray")
    bundle = split_model(analysis, interior[len(interior) // 2], root / "bundle", codec="none")
    onnx.save(model, root / "model.onnx")
    inputs = root / "inputs.npz"
    np.savez(inputs, **analysis.graph.sample_inputs(seed=3))
    return bundle, root / "model.onnx", inputs


def test_two_nodes_serve_and_a_removed_node_loses_no_request(netns, resnet_bundle, tmp_path):
    bundle, model, inputs = resnet_bundle
    assert StackedRuns.eligible(make_session(bundle.tail_path))  # so that @serve.batch is exercised
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    args = [str(HELPER), str(bundle.path), str(model), str(inputs), str(tmp_path)]
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=NETNS_TIMEOUT_S,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads(proc.stdout)
    print(json.dumps(report, indent=1))  # shown with -s: timings, retries, who served

    # Every request was answered once, by the server (no device retry, no local fallback),
    # and equals the unsplit model.
    assert report["wrong"] == []
    assert report["phase2_errors"] == []
    assert report["answered"] == report["unique_answered"] == report["server_results"]
    assert report["max_device_attempts"] == 1
    # Both nodes served before the removal ...
    assert set(report["served_by_before"]) == {"head", "worker"}
    # ... and after it every phase-2 request was still answered: those the worker could not
    # finish were sent again to the head's replica.
    assert report["phase2_answered"] == report["phase2_requests"]
    assert report["served_in_phase2"]["head"] >= report["phase2_requests"] - report["removed_after"]
    assert report["server_errors"] == {}
    # Unloading the version deleted its Ray Serve application.
    assert report["app_before_unload"] is True and report["app_after_unload"] is False


def test_autoscale_bounds_parse_or_fail_clearly() -> None:
    from edgeoffload.cli.serve import _autoscale_bounds

    assert _autoscale_bounds(None) is None
    assert _autoscale_bounds("1:4") == (1, 4)
    for bad in ("4:1", "0:2", "3", "a:b", "1:"):
        with pytest.raises(UsageError, match="MIN:MAX"):
            _autoscale_bounds(bad)


def test_admission_counts_the_ray_replicas_as_workers(tmp_path) -> None:
    """Nothing starts here (Ray starts with the server): only the seats are checked."""
    from edgeoffload.edge.allowlist import AllowList
    from edgeoffload.edge.server import EdgeServer, ServerConfig
    from edgeoffload.lab.harness import ThrowawayKeys

    keys = ThrowawayKeys.create(tmp_path / "keys")

    def seats(**config: object) -> int:
        server = EdgeServer(
            [],
            identity=keys.server,
            allow=AllowList(keys.allow_file),
            config=ServerConfig(**config),
        )
        return server.admission.workers

    assert seats(workers=1, batch_max=4) == 4  # local: the pool's workers
    assert seats(workers=1, batch_max=4, executor="ray", ray_replicas=3) == 12
    assert seats(workers=1, executor="ray", ray_min_replicas=1, ray_max_replicas=5) == 5
    assert seats(workers=8, executor="ray", ray_replicas=2) == 8  # never fewer than ours
