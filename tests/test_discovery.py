"""Discovery over mDNS/DNS-SD: the TXT record, the trust filter, and two real servers found in a
network namespace of the test's own, of which the device uses only the one whose key it pinned.

The pure tests need no network. The end-to-end test runs tests/_discovery_netns.py under
``unshare -n`` (multicast on that namespace's loopback only, never on the machine's
interfaces) with real zeroconf, real edge servers and a real offload; it is skipped, saying
why, where a network namespace cannot be made (not root).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgeoffload.cli import app
from edgeoffload.device import discovery
from edgeoffload.device.discovery import DiscoveredServer, discover, parse_service, trusted
from edgeoffload.edge.advertise import (
    SERVICE_TYPE,
    TXT_LIMIT,
    Advertiser,
    advertised_addresses,
    instance_name,
    txt_properties,
)
from edgeoffload.errors import UsageError
from edgeoffload.keys import KeyPair, fingerprint
from edgeoffload.lab.harness import netns_unavailable
from edgeoffload.protocol.connection import PROTOCOL_VERSION

HELPER = Path(__file__).with_name("_discovery_netns.py")
NETNS_TIMEOUT_S = 120
VERSIONS = ("0123456789abcdef", "fedcba9876543210")


def _raw(properties: dict[str, str]) -> dict[bytes, bytes | None]:
    """TXT properties as zeroconf hands them to a browser."""
    return {k.encode(): v.encode() for k, v in properties.items()}


def _server(key: KeyPair, *, url: str, protocol: int = PROTOCOL_VERSION, bundles=VERSIONS):
    return DiscoveredServer(
        name=f"edge-{key.fingerprint[:4]}",
        url=url,
        fingerprint=key.fingerprint,
        bundles=tuple(bundles),
        protocol=protocol,
    )


# -- the record: what the server writes is what the device reads ------------------------------


def test_the_two_sides_agree_on_the_service_type():
    assert SERVICE_TYPE == discovery.SERVICE_TYPE == "_edgeoffload._tcp.local."


def test_txt_record_round_trip():
    key = KeyPair.generate()
    props = txt_properties(key.public, reversed(VERSIONS))
    assert props == {
        "v": str(PROTOCOL_VERSION),
        "fp": fingerprint(key.public),
        "bundles": ",".join(VERSIONS),  # sorted
        "nb": "2",
    }
    name = f"{instance_name(8765, key.public, hostname='edge1.lan')}.{SERVICE_TYPE}"
    server = parse_service(name, ["127.0.0.1"], 8765, _raw(props))
    assert server == DiscoveredServer(
        name=f"edge1-8765-{key.fingerprint[:9]}",
        url="ws://127.0.0.1:8765",
        fingerprint=key.fingerprint,
        bundles=VERSIONS,
        protocol=PROTOCOL_VERSION,
        bundles_complete=True,
    )


def test_many_bundles_are_cut_to_one_txt_string_and_the_device_knows():
    key = KeyPair.generate()
    versions = [f"{i:016x}" for i in range(40)]
    props = txt_properties(key.public, versions)
    listed = props["bundles"].split(",")
    assert listed == versions[:14]  # 16 + 13 x 17 bytes after "bundles="
    assert len(f"bundles={props['bundles']}") <= 255  # one DNS TXT string
    assert sum(1 + len(f"{k}={v}") for k, v in props.items()) < TXT_LIMIT
    server = parse_service(f"x.{SERVICE_TYPE}", ["127.0.0.1"], 1, _raw(props))
    assert server is not None and not server.bundles_complete
    # A version beyond the cut may still be served: the filter keeps such a server.
    assert trusted([server], [key.public], bundle=versions[-1]) == [(server.url, key.public)]


def test_server_names_are_unique_labels():
    a, b = KeyPair.generate(), KeyPair.generate()
    long_host = "a-very-long-host-name-that-goes-on-and-on-and-on-forever.example.org"
    names = {
        instance_name(port, key.public, hostname=host)
        for port in (8765, 8766)
        for key in (a, b)
        for host in ("edge1", long_host)
    }
    assert len(names) == 8
    assert all(len(n.encode()) <= 63 and "." not in n for n in names)


@pytest.mark.parametrize(
    "bad",
    [
        ["-", "1.2.3.4"],
        ["bad version with spaces"],
        ["0123,4567"],
    ],
)
def test_bundle_versions_that_would_break_the_list_are_refused(bad):
    with pytest.raises(UsageError):
        txt_properties(KeyPair.generate().public, bad)


def test_the_server_is_announced_where_it_listens():
    assert advertised_addresses("127.0.0.1")[:2] == (["127.0.0.1"], ["127.0.0.1"])
    addresses, _, _ = advertised_addresses("0.0.0.0")
    assert addresses  # at least loopback
    with pytest.raises(UsageError, match="IP address"):
        advertised_addresses("edge.example.org")
    with pytest.raises(UsageError):
        Advertiser(host="127.0.0.1", port=0, public_key=KeyPair.generate().public, bundles=[])


_GOOD = {"v": "1", "fp": "mfrg-gzdf-mztw-q2lk", "bundles": VERSIONS[0], "nb": "1"}


@pytest.mark.parametrize(
    ("why", "addresses", "port", "properties"),
    [
        ("no TXT at all", ["127.0.0.1"], 8765, {}),
        ("no fp", ["127.0.0.1"], 8765, {b"v": b"1", b"nb": b"0"}),
        ("no v", ["127.0.0.1"], 8765, {b"fp": _GOOD["fp"].encode(), b"nb": b"0"}),
        ("v not a number", ["127.0.0.1"], 8765, _raw({**_GOOD, "v": "one"})),
        ("v negative", ["127.0.0.1"], 8765, _raw({**_GOOD, "v": "-1"})),
        ("fp not a fingerprint", ["127.0.0.1"], 8765, _raw({**_GOOD, "fp": "x25519:abc"})),
        ("fp upper case", ["127.0.0.1"], 8765, _raw({**_GOOD, "fp": _GOOD["fp"].upper()})),
        ("bundles with junk", ["127.0.0.1"], 8765, _raw({**_GOOD, "bundles": "ab,<script>"})),
        ("empty bundle entry", ["127.0.0.1"], 8765, _raw({**_GOOD, "bundles": "ab,,cd"})),
        ("nb smaller than the list", ["127.0.0.1"], 8765, _raw({**_GOOD, "nb": "0"})),
        ("not ASCII", ["127.0.0.1"], 8765, {**_raw(_GOOD), b"fp": b"\xff\xfe"}),
        ("boolean v", ["127.0.0.1"], 8765, {**_raw(_GOOD), b"v": None}),
        ("no address", [], 8765, _raw(_GOOD)),
        ("only a scoped address", ["fe80::1%2"], 8765, _raw(_GOOD)),
        ("port 0", ["127.0.0.1"], 0, _raw(_GOOD)),
        ("no port", ["127.0.0.1"], None, _raw(_GOOD)),
    ],
)
def test_malformed_announcements_are_skipped(why, addresses, port, properties):
    assert parse_service(f"junk.{SERVICE_TYPE}", addresses, port, properties) is None, why


def test_a_well_formed_announcement_parses_and_prefers_ipv4():
    base = parse_service(f"ok.{SERVICE_TYPE}", ["2001:db8::7", "192.0.2.7"], 9, _raw(_GOOD))
    assert base is not None and base.url == "ws://192.0.2.7:9" and base.name == "ok"
    v6 = parse_service(f"ok.{SERVICE_TYPE}", ["fe80::1", "2001:db8::7"], 9, _raw(_GOOD))
    assert v6 is not None and v6.url == "ws://[2001:db8::7]:9"


# -- trust: only pinned keys, never what was announced ------------------------------------------


def test_trusted_keeps_only_pinned_keys_and_returns_the_pinned_key():
    mine, stranger = KeyPair.generate(), KeyPair.generate()
    found = [_server(stranger, url="ws://192.0.2.1:1"), _server(mine, url="ws://192.0.2.2:2")]
    assert trusted(found, [mine.public]) == [("ws://192.0.2.2:2", mine.public)]
    assert trusted(found, {mine.fingerprint: mine.public}) == [("ws://192.0.2.2:2", mine.public)]
    assert trusted(found, []) == []


def test_trusted_drops_another_protocol_version_and_bundles_not_served():
    key = KeyPair.generate()
    old = _server(key, protocol=PROTOCOL_VERSION + 1, url="ws://192.0.2.1:1")
    current = _server(key, url="ws://192.0.2.2:2")
    assert trusted([old, current], [key.public]) == [("ws://192.0.2.2:2", key.public)]
    assert len(trusted([old, current], [key.public], protocol=None)) == 2
    assert trusted([current], [key.public], bundle=VERSIONS[1]) == [(current.url, key.public)]
    assert trusted([current], [key.public], bundle="00000000deadbeef") == []


def test_trusted_refuses_pins_that_are_not_keys():
    key, other = KeyPair.generate(), KeyPair.generate()
    with pytest.raises(UsageError, match="one key"):
        trusted([], key.public)
    with pytest.raises(UsageError):
        trusted([], [b"short"])
    with pytest.raises(UsageError, match="fingerprint"):
        trusted([], {other.fingerprint: key.public})


def test_discover_bounds_its_timeout():
    import asyncio

    for timeout in (0, -1, 61):
        with pytest.raises(UsageError):
            asyncio.run(discover(timeout))


# -- the CLI flag ---------------------------------------------------------------------------------


def test_serve_help_shows_advertise():
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "--advertise" in result.output and "--no-advertise" in result.output


# -- end to end, in a network namespace of our own -----------------------------------------------


@pytest.fixture(scope="module")
def netns():
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def resnet_bundle(tmp_path_factory):
    from edgeoffload.split import zoo
    from edgeoffload.split.analysis import Analysis
    from edgeoffload.split.splitter import split_model

    analysis = Analysis.of(zoo.build("resnet"))
    interior = [c for c in analysis.cuts if 0 < c.index < len(analysis.graph.nodes)]
    root = tmp_path_factory.mktemp("discovery")
    bundle = split_model(analysis, interior[len(interior) // 2], root / "bundle", codec="none")
    inputs = root / "inputs.npz"
    np.savez(inputs, **analysis.graph.sample_inputs(seed=3))
    return bundle, inputs


def test_device_finds_two_servers_and_uses_only_the_trusted_one(netns, resnet_bundle, tmp_path):
    bundle, inputs = resnet_bundle
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    args = [str(HELPER), str(bundle.path), str(inputs), str(tmp_path)]
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=NETNS_TIMEOUT_S,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    (mine, theirs) = report["servers"]

    # Discovery found both announced servers, each with its own key's fingerprint ...
    found = {s["fingerprint"]: s for s in report["found"]}
    assert sorted(found) == sorted([mine["fingerprint"], theirs["fingerprint"]])
    for server in (mine, theirs):
        assert found[server["fingerprint"]]["url"] == server["url"]
        assert found[server["fingerprint"]]["bundles"] == [bundle.manifest.version]
        assert found[server["fingerprint"]]["protocol"] == PROTOCOL_VERSION
    # ... the device trusted only the pinned one, and its request went there, correctly ...
    assert report["trusted"] == [mine["url"]]
    assert report["outputs_equal"] is True
    assert report["results_here"] == 1
    # ... and the other server's address with the trusted key fails the handshake.
    assert report["untrusted_error"] == "AuthenticationFailed"
    # `serve --advertise` says goodbye on SIGTERM, and is no longer found.
    assert report["goodbye_seen"] is True
    assert report["after_stop"] == [mine["fingerprint"]]


@pytest.mark.skipif(
    [name for _, name in socket.if_nameindex()] == ["lo"],
    reason="this machine has only a loopback interface: nothing for the guard to protect",
)
def test_the_namespace_script_refuses_to_run_on_the_real_interfaces(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(HELPER), "bundle", "inputs.npz", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert proc.returncode == 3 and "refusing" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_browsing_without_a_usable_interface_is_a_clear_error(netns):
    # A fresh namespace whose loopback is still down: no interface has an address.
    script = (
        "import asyncio\n"
        "from edgeoffload.device.discovery import discover\n"
        "from edgeoffload.errors import EdgeOffloadError\n"
        "try:\n"
        "    asyncio.run(discover(0.5))\n"
        "except EdgeOffloadError as exc:\n"
        "    print(type(exc).__name__, exc.hint, sep='|')\n"
    )
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    kind, hint = proc.stdout.strip().split("|")
    assert kind == "EdgeOffloadError" and "multicast on" in hint
