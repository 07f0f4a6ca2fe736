"""Discovery end to end, run by tests/test_discovery.py inside its own network namespace.

``unshare -n python tests/_discovery_netns.py BUNDLE INPUTS.npz WORKDIR`` gives this process a
namespace that holds only a loopback interface; the script refuses to run anywhere else, so
multicast never reaches the machine's real interfaces. There it turns ``lo`` on with
multicast and starts two real edge servers on 127.0.0.1 with different keys, both announced
over mDNS: one in this process (``EdgeServer`` + ``Advertiser``), one as an
``edgeoffload serve --advertise`` process (the CLI path). Its allow-list admits the device
too, so that only the device's key pin tells the servers apart. The device browses, trusts
one key, offloads a request to that server and tries the other one with the trusted key.
Then the CLI server is stopped (SIGTERM) and must say goodbye. One JSON object on stdout
tells the test what happened; logs go to stderr.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from zeroconf import ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

from edgeoffload.bundle import Bundle, load_bundle
from edgeoffload.device.client import OffloadClient
from edgeoffload.device.discovery import discover, trusted
from edgeoffload.device.runtime import DeviceRuntime
from edgeoffload.edge.advertise import SERVICE_TYPE, Advertiser, instance_name
from edgeoffload.edge.allowlist import AllowList
from edgeoffload.edge.server import EdgeServer, ServerConfig
from edgeoffload.errors import AuthenticationFailed
from edgeoffload.keys import KeyPair, generate_identity
from edgeoffload.lab.harness import ServerProcess, ThrowawayKeys, spawn_server

BROWSE_S = 3.0  # the device listens this long (announcements arrive within about 1 s)
SCENARIO_S = 90.0


def _only_loopback() -> bool:
    # if_nameindex asks the kernel about this process's namespace (unlike /sys/class/net).
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def _loopback_multicast() -> None:
    for args in (["ip", "link", "set", "lo", "up"], ["ip", "link", "set", "lo", "multicast", "on"]):
        subprocess.run(args, check=True, timeout=10)


async def scenario(bundle_dir: Path, inputs_file: Path, workdir: Path) -> dict[str, Any]:
    bundle = load_bundle(bundle_dir)
    with np.load(inputs_file) as data:
        inputs = {name: data[name] for name in data.files}
    keys = ThrowawayKeys.create(workdir / "keys", devices=("phone",))
    # A server the device has never pinned, admitting the same device.
    other_root = workdir / "other"
    other = ThrowawayKeys(
        other_root, generate_identity(other_root / "server"), keys.devices, keys.allow_file
    )
    report: dict[str, Any] = {}
    mine = EdgeServer(
        [bundle],
        identity=keys.server,
        allow=AllowList(keys.allow_file),
        config=ServerConfig(port=0, workers=1),
    )
    await mine.start()
    theirs: ServerProcess | None = None
    try:
        async with Advertiser(
            host="127.0.0.1", port=mine.port, public_key=keys.server.public, bundles=mine.bundles
        ):
            theirs = await asyncio.to_thread(
                spawn_server, [bundle_dir], other, workers=1, extra_args=["--advertise"]
            )
            report["servers"] = [
                {"url": f"ws://127.0.0.1:{mine.port}", "fingerprint": keys.server.fingerprint},
                {"url": theirs.url, "fingerprint": other.server.fingerprint},
            ]

            found = await discover(BROWSE_S)
            report["found"] = [
                {
                    "name": s.name,
                    "url": s.url,
                    "fingerprint": s.fingerprint,
                    "bundles": list(s.bundles),
                    "protocol": s.protocol,
                }
                for s in found
            ]
            chosen = trusted(found, [keys.server.public], bundle=bundle.manifest.version)
            report["trusted"] = [url for url, _ in chosen]

            url, server_key = chosen[0]
            async with OffloadClient(
                bundle, server=url, server_key=server_key, identity=keys.device, fallback="error"
            ) as client:
                got = await client.run(inputs)
            local = DeviceRuntime(bundle).run_local(inputs)
            report["outputs_equal"] = sorted(got) == sorted(local) and all(
                np.array_equal(got[name], local[name]) for name in local
            )
            report["results_here"] = mine.stats.results

            # The pin is what protects: the other server's address with the trusted key.
            untrusted = [s.url for s in found if s.fingerprint == other.server.fingerprint]
            report["untrusted_error"] = "not found"
            if untrusted:
                report["untrusted_error"] = await _offload_error(
                    bundle, untrusted[0], keys.server.public, keys.device, inputs
                )

            # SIGTERM: the CLI server says goodbye before it drains, so a browser that saw it
            # drops it at once (its records would otherwise live for their TTL, minutes) and
            # a new browse finds only the server still announced.
            name = instance_name(theirs.port, other.server.public)
            report["goodbye_seen"] = await _goodbye_seen(name, theirs)
            report["after_stop"] = [s.fingerprint for s in await discover(BROWSE_S)]
    finally:
        if theirs is not None:
            await asyncio.to_thread(theirs.stop)
        await mine.shutdown()
    return report


async def _goodbye_seen(name: str, server: ServerProcess) -> bool:
    """Whether a browser that has seen instance ``name`` is told it left when ``server`` stops."""
    added, removed = asyncio.Event(), asyncio.Event()
    wanted = f"{name}.{SERVICE_TYPE}"

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if name == wanted and state_change is ServiceStateChange.Added:
            added.set()
        elif name == wanted and state_change is ServiceStateChange.Removed:
            removed.set()

    browser_zc = AsyncZeroconf(interfaces=["127.0.0.1"])
    browser = AsyncServiceBrowser(browser_zc.zeroconf, SERVICE_TYPE, handlers=[on_change])
    try:
        await asyncio.wait_for(added.wait(), BROWSE_S)
        await asyncio.to_thread(server.stop)
        await asyncio.wait_for(removed.wait(), BROWSE_S)
        return True
    except asyncio.TimeoutError:
        return False
    finally:
        await browser.async_cancel()
        await browser_zc.async_close()


async def _offload_error(
    bundle: Bundle, url: str, server_key: bytes, identity: KeyPair, inputs: dict[str, Any]
) -> str | None:
    """The name of the AuthenticationFailed a request raises, or None if it succeeds."""
    try:
        async with OffloadClient(
            bundle, server=url, server_key=server_key, identity=identity, fallback="error"
        ) as client:
            await client.run(inputs)
    except AuthenticationFailed as exc:
        return type(exc).__name__
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    if not _only_loopback():
        print("refusing to run: not in a fresh network namespace (unshare -n)", file=sys.stderr)
        return 3
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    _loopback_multicast()
    bundle_dir, inputs_file, workdir = (Path(a) for a in argv)
    report = asyncio.run(asyncio.wait_for(scenario(bundle_dir, inputs_file, workdir), SCENARIO_S))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
