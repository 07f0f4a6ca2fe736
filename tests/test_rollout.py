"""A rolling upgrade across a fleet, then a rollback, while devices keep asking.

Three ``edgeoffload serve --repository`` processes on 127.0.0.1, each with its own repository
holding versions 1 and 2 of one model (a small MLP; v2 has other weights, so a reply from a v1
head and a v2 tail — or the reverse — is detectably wrong), both signed by the publisher every
server and device trusts. Sixteen devices (``update="auto"``, each its own key and store) send
requests continuously to the fleet. ``run_rollout`` (what ``edgeoffload fleet rollout`` runs)
moves the model to version 2 through a canary share, then ``run_rollback`` moves it back.
Across both: no failed request, every reply equal to the full model of the version that
served it, every device on the new version within a bounded time, the old version unloaded on
every server. Plus the plan file and the share (pure), and a rollout to a version that fails
verification, refused before anything changes.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeoffload.bundle import load_bundle
from edgeoffload.device.client import OffloadClient
from edgeoffload.device.pool import EdgeEndpoint
from edgeoffload.device.runtime import DeviceRuntime
from edgeoffload.edge.rollout import (
    PLAN_FILE,
    FleetServer,
    PlanReader,
    RolloutError,
    RolloutPlan,
    in_share,
    run_rollback,
    run_rollout,
    scrape,
)
from edgeoffload.errors import UsageError
from edgeoffload.lab.harness import ThrowawayKeys, spawn_server
from edgeoffload.signing import generate_publisher, sign_bundle
from edgeoffload.split.analysis import Analysis
from edgeoffload.split.splitter import split_model

MODEL = "mlp"
DEVICES = 16
SERVERS = 3


def mlp(seed: int) -> onnx.ModelProto:
    """x[1,64] -> MatMul -> Relu -> MatMul -> y[1,16], weights from ``seed``."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 128)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((128, 16)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="layer1/matmul"),
        helper.make_node("Relu", ["h0"], ["h"], name="layer1/relu"),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="layer2/matmul"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        initializer=[w1, w2],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


# -- pure -----------------------------------------------------------------------------------------


def test_share_is_stable_and_widens_monotonically() -> None:
    keys = [bytes([i]) * 32 for i in range(200)]
    at = {s: {k for k in keys if in_share(k, MODEL, s)} for s in (0.1, 0.5, 1.0)}
    assert at[0.1] <= at[0.5] <= at[1.0] == set(keys)
    assert 5 <= len(at[0.1]) <= 40 and 60 <= len(at[0.5]) <= 140  # about 10 % and 50 %
    assert {k for k in keys if in_share(k, "other", 0.5)} != at[0.5]  # per model
    assert not any(in_share(k, MODEL, 0.0) for k in keys)


def test_plan_file_is_strict_and_a_malformed_one_offers_nothing(tmp_path: Path) -> None:
    plan = RolloutPlan(2, 0.25, "canary", 1, 1.5)
    assert RolloutPlan.parse(plan.to_dict()) == plan
    for bad in (
        {"target": 0, "share": 0.5, "phase": "canary"},
        {"target": 2, "share": 1.5, "phase": "canary"},
        {"target": 2, "share": 0.5, "phase": "later"},
        {"target": 2, "share": 0.5, "phase": "canary", "extra": 1},
        {"target": True, "share": 0.5, "phase": "canary"},
    ):
        with pytest.raises(UsageError):
            RolloutPlan.parse(bad)
    reader = PlanReader()
    assert reader.plan(tmp_path) is None
    (tmp_path / PLAN_FILE).write_text("{not json")
    assert reader.plan(tmp_path) == PlanReader.HOLD and PlanReader.HOLD.share == 0.0
    (tmp_path / PLAN_FILE).write_text(json.dumps(plan.to_dict()))
    time.sleep(0.01)  # a new mtime
    (tmp_path / PLAN_FILE).write_text(json.dumps(plan.to_dict()))
    assert reader.plan(tmp_path) == plan


# -- the fleet ------------------------------------------------------------------------------------


def server_args(repo: Path, trust: Path) -> list[str]:
    return ["--repository", str(repo), "--trust", str(trust), "--repository-interval", "0.2"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("rollout")
    publisher = generate_publisher(root / "publisher")
    trust = root / "trusted.pub"
    trust.write_text((root / "publisher" / "publisher.pub").read_text())
    versions = {}
    for number, seed in ((1, 11), (2, 22)):
        analysis = Analysis.of(mlp(seed))
        cut = next(c for c in analysis.cuts if [t.name for t in c.tensors] == ["h"])
        bundle = split_model(analysis, cut, root / f"v{number}", codec="none")
        sign_bundle(bundle.path, publisher)
        versions[number] = bundle
    bad = root / "v3"  # signed, then a byte of the tail flipped: fails verification
    shutil.copytree(versions[2].path, bad)
    tail = bad / "tail.onnx"
    data = bytearray(tail.read_bytes())
    data[-1] ^= 1
    tail.write_bytes(bytes(data))
    keys = ThrowawayKeys.create(root / "keys", devices=[f"dev{i}" for i in range(DEVICES)])
    repos = []
    for s in range(SERVERS):
        repo = root / f"repo{s}"
        for number in (1, 2):
            shutil.copytree(versions[number].path, repo / MODEL / str(number))
        (repo / MODEL / "policy.json").write_text('{"policy": "pinned", "versions": [1]}')
        repos.append(repo)
    fleet_keys = [keys] + [keys.another_server(f"server{s}") for s in range(1, SERVERS)]
    servers = []
    try:
        for repo, server_keys in zip(repos, fleet_keys, strict=True):
            servers.append(
                spawn_server(
                    [],
                    server_keys,
                    workers=1,
                    extra_args=server_args(repo, trust),
                )
            )
        yield {
            "root": root,
            "versions": versions,
            "bad": bad,
            "keys": keys,
            "trusted": (publisher.public,),
            "repos": repos,
            "servers": servers,
            "endpoints": [
                EdgeEndpoint(p.url, k.server.public)
                for p, k in zip(servers, fleet_keys, strict=True)
            ],
            "fleet": [
                FleetServer(repo, f"http://127.0.0.1:{p.port}/metrics")
                for repo, p in zip(repos, servers, strict=True)
            ],
        }
    finally:
        for process in servers:
            process.stop()


class Devices:
    """Sixteen updating devices in one event loop (a thread), each asking in a loop and checking
    every reply against the full model of the version that served it."""

    def __init__(self, fleet: dict[str, Any], expected: dict[str, dict[int, np.ndarray]]):
        self.fleet = fleet
        self.expected = expected  # bundle version -> input index -> full-model output
        self.inputs = [
            {"x": np.random.default_rng(100 + i).standard_normal((1, 64), np.float32)}
            for i in range(4)
        ]
        self.answered: Counter[str] = Counter()  # by bundle version
        self.failures: list[str] = []
        self.wrong: list[str] = []
        self.on: dict[int, str] = {}  # device -> version of its last reply
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _device(self, index: int) -> None:
        keys: ThrowawayKeys = self.fleet["keys"]
        label = f"dev{index}"
        client = OffloadClient(
            self.fleet["versions"][1].path,
            servers=self.fleet["endpoints"],
            identity=keys.devices[label],
            fallback="error",  # a reply computed here would prove nothing
            timeout=20.0,
            update="auto",
            store=self.fleet["root"] / "stores" / label,
            trusted_publishers=self.fleet["trusted"],
            update_check=0.3,
            update_retry=(0.05, 0.5),
        )
        try:
            for n in range(100_000):  # bounded; the test stops it much earlier
                if self._stop.is_set():
                    return
                k = (index + n) % len(self.inputs)
                try:
                    got = await client.run(self.inputs[k])
                except Exception as exc:  # every failure is a test failure, recorded
                    self.failures.append(f"{label}: {type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.05)
                    continue
                timing = client.last_timing
                assert timing is not None
                version = timing.version
                self.answered[version] += 1
                self.on[index] = version
                reference = self.expected.get(version, {}).get(k)
                if reference is None or not np.array_equal(got["y"], reference):
                    self.wrong.append(f"{label} request {n} on {version}")
                await asyncio.sleep(0.01)
        finally:
            await client.close()

    async def _main(self) -> None:
        await asyncio.gather(*(self._device(i) for i in range(DEVICES)))

    def __enter__(self) -> Devices:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def wait(self, what: str, check, timeout: float) -> float:
        """Seconds until ``check()`` holds (AssertionError after ``timeout``)."""
        start = time.monotonic()
        while not check():
            if time.monotonic() - start > timeout or not self._thread.is_alive():
                raise AssertionError(f"timed out waiting for {what}: {self.summary()}")
            time.sleep(0.05)
        return time.monotonic() - start

    def summary(self) -> str:
        return (
            f"answered {dict(self.answered)}, on {Counter(self.on.values())}, "
            f"failures {self.failures[:3]}, wrong {self.wrong[:3]}"
        )


def test_rolling_upgrade_and_rollback_with_zero_failed_requests(fleet) -> None:
    v1, v2 = (fleet["versions"][n].manifest.version for n in (1, 2))
    devices_inputs = [
        {"x": np.random.default_rng(100 + i).standard_normal((1, 64), np.float32)} for i in range(4)
    ]
    expected = {
        fleet["versions"][n].manifest.version: {
            k: DeviceRuntime(fleet["versions"][n]).run_local(x)["y"]
            for k, x in enumerate(devices_inputs)
        }
        for n in (1, 2)
    }
    assert not np.array_equal(expected[v1][0], expected[v2][0])
    keys: ThrowawayKeys = fleet["keys"]
    in_canary = {i for i in range(DEVICES) if in_share(keys.devices[f"dev{i}"].public, MODEL, 0.25)}
    lines: list[str] = []
    seen: list[tuple[str, set[int]]] = []  # at each progress line: the devices on v2

    def progress(line: str) -> None:
        lines.append(line)
        seen.append((line, {i for i, v in devices.on.items() if v == v2}))

    with Devices(fleet, expected) as devices:
        devices.wait("every device answered on v1", lambda: len(devices.on) == DEVICES, 120)
        started = time.monotonic()
        report = run_rollout(
            fleet["fleet"],
            MODEL,
            2,
            shares=(0.25, 1.0),
            watch=1.0,
            load_timeout=60,
            retire_timeout=60,
            trusted=fleet["trusted"],
            progress=progress,
        )
        rollout_s = time.monotonic() - started
        assert report.outcome == "done", (report, lines)
        moved_s = devices.wait(
            "every device on v2",
            lambda: len(devices.on) == DEVICES and set(devices.on.values()) == {v2},
            60,
        )
        for server in fleet["fleet"]:
            assert v1 not in scrape(server).loaded and v2 in scrape(server).loaded
        # The canary offered v2 only to the devices in its share (a stable hash of their key).
        canary = next(s for s in report.steps if s.phase == "canary")
        assert canary.share == 0.25 and canary.failures == 0
        at_canary = next(moved for line, moved in seen if line.startswith("canary"))
        assert at_canary <= in_canary, (at_canary, in_canary)

        back = run_rollback(fleet["fleet"], MODEL, 1, retire_timeout=60, progress=lines.append)
        assert back.outcome == "rolled_back"
        devices.wait(
            "every device back on v1",
            lambda: set(devices.on.values()) == {v1} and devices.answered[v1] > 0,
            60,
        )
        for server in fleet["fleet"]:
            assert v2 not in scrape(server).loaded and v1 in scrape(server).loaded
        before = sum(devices.answered.values())
        devices.wait(
            "requests after the rollback",
            lambda: sum(devices.answered.values()) > before + DEVICES,
            60,
        )
    assert devices.failures == [], devices.summary()
    assert devices.wrong == [], devices.summary()
    assert devices.answered[v1] > 0 and devices.answered[v2] > 0
    print(
        f"rollout {rollout_s:.1f} s (steps: "
        + ", ".join(f"{s.phase} {s.seconds:.1f} s" for s in report.steps)
        + f"); last device on v2 {moved_s:.1f} s after; rollback {back.seconds:.1f} s; "
        f"answered {dict(devices.answered)}; canary share {len(in_canary)} devices, on v2 at the "
        f"canary check {len(at_canary)}"
    )


def test_a_version_failing_verification_is_refused_before_anything_changes(fleet) -> None:
    for repo in fleet["repos"]:
        target = repo / MODEL / "3"
        if not target.exists():
            shutil.copytree(fleet["bad"], target)
    policies = [(r / MODEL / "policy.json").read_text() for r in fleet["repos"]]
    plans = [
        (r / MODEL / PLAN_FILE).read_text()
        for r in fleet["repos"]
        if (r / MODEL / PLAN_FILE).exists()
    ]
    with pytest.raises(RolloutError, match="fails verification"):
        run_rollout(fleet["fleet"], MODEL, 3, trusted=fleet["trusted"], watch=0)
    assert [(r / MODEL / "policy.json").read_text() for r in fleet["repos"]] == policies
    assert [
        (r / MODEL / PLAN_FILE).read_text()
        for r in fleet["repos"]
        if (r / MODEL / PLAN_FILE).exists()
    ] == plans
    with pytest.raises(RolloutError, match="does not exist"):
        run_rollout(fleet["fleet"], MODEL, 9, watch=0)
    # The fleet still serves: a plain device gets the current version's answer.
    assert load_bundle(fleet["versions"][1].path, trusted=fleet["trusted"]).publisher is not None


def test_fleet_commands_refuse_a_bad_version_and_show_the_plan(fleet, capsys) -> None:
    from edgeoffload.cli import main

    for repo in fleet["repos"]:
        if not (repo / MODEL / "3").exists():
            shutil.copytree(fleet["bad"], repo / MODEL / "3")
    pairs = [
        arg
        for server in fleet["fleet"]
        for arg in ("--repository", str(server.repository), "--metrics", server.metrics_url)
    ]
    trust = fleet["root"] / "trusted.pub"
    code = main(["fleet", "rollout", MODEL, "3", *pairs, "--trust", str(trust), "--watch", "0"])
    err = capsys.readouterr().err
    assert code == 11 and "fails verification" in err and "Traceback" not in err, err
    code = main(["fleet", "rollout", MODEL, "2", "--repository", str(fleet["repos"][0])])
    assert code == 2, capsys.readouterr().err  # one --metrics per --repository
    capsys.readouterr()
    assert main(["fleet", "plan", "--repository", str(fleet["repos"][0]), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)  # one model: one object
    assert row["model"] == MODEL and row["versions"] == [1, 2, 3]
    assert row["policy"].startswith("pinned")
