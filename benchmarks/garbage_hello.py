"""What an unauthenticated first message costs the edge server (PROTOCOL.md §5.3, §13).

Usage:  python benchmarks/garbage_hello.py [--iterations 20000] [--output results.json]

Times ``ServerConnection.receive`` (the sans-I/O server, no sockets) on the first message of a
connection, one fresh connection per message, with ``time.perf_counter_ns`` around the call
alone, for three kinds of first message:

* ``garbage``: random bytes, 200..4000 long (fixed seed), as a scanner or a confused client
  sends;
* ``bad mac1``: a well-formed hello envelope whose ``mac1`` has one bit flipped, as a device
  that pinned another server key, or a forger, sends;
* ``valid hello``: an accepted handshake message 1 (two X25519 for message 1, an ephemeral key
  and two more for message 2): the baseline, measured in the same run.

The first two must be refused before any Diffie-Hellman: the target is < 50 µs each, and the
ratio column shows them against the valid hello. Prints a table of mean / p50 / p99 µs per
message; ``--output`` also writes JSON with the machine and versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edgeoffload.errors import AuthenticationFailed, RemoteProtocolError
from edgeoffload.keys import KeyPair
from edgeoffload.protocol.connection import (
    MAX_HELLO_BYTES,
    ClientConnection,
    HostedBundle,
    ReplayGuard,
    ServerConnection,
)
from edgeoffload.protocol.events import HandshakeComplete
from edgeoffload.protocol.wire import pack, unpack

DEVICE = KeyPair.from_private(bytes(range(1, 33)))
SERVER = KeyPair.from_private(bytes(range(101, 133)))
BUNDLE = "83e3c06273c8bb8c92bb593a76e793f19cb60881da85df496f34162b9c1020ae:c3"
VERSION = "0123456789abcdef"
HOSTED = {VERSION: HostedBundle(BUNDLE, VERSION)}
TIME_NS = 1_767_225_600_123_456_789
TARGET_US = 50.0


def new_server() -> ServerConnection:
    # A fresh replay guard per connection, so that the same valid hello is accepted each time.
    return ServerConnection(
        static=SERVER,
        is_allowed=lambda key: key == DEVICE.public,
        bundles=HOSTED,
        replay_guard=ReplayGuard(),
        max_message=1 << 20,
    )


def valid_hello() -> bytes:
    client = ClientConnection(
        static=DEVICE, server_public=SERVER.public, bundle=BUNDLE, version=VERSION, time_ns=TIME_NS
    )
    client.start()
    (message,) = client.data_to_send()
    return bytes(message)


def bad_mac1_hello() -> bytes:
    envelope = unpack(valid_hello(), max_bin=4096)
    tag = bytearray(envelope["mac1"])
    tag[7] ^= 0x10
    return pack(dict(envelope, mac1=bytes(tag)))


def garbage(count: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(200, 4001, size=count)
    return [rng.bytes(int(n)) for n in sizes]


def measure(
    messages: Sequence[bytes], iterations: int, expect: Callable[[object], bool]
) -> list[float]:
    """µs per ``receive`` call, each on a fresh connection (constructed outside the timing)."""
    samples: list[float] = []
    for i in range(iterations):
        data = messages[i % len(messages)]
        server = new_server()
        start = time.perf_counter_ns()
        try:
            outcome: object = server.receive(data)
        except (AuthenticationFailed, RemoteProtocolError) as exc:
            outcome = exc
        samples.append((time.perf_counter_ns() - start) / 1000)
        if not expect(outcome):
            raise SystemExit(f"unexpected outcome {outcome!r}")
    return samples


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20_000, help="messages per kind")
    parser.add_argument("--output", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    n = max(1, args.iterations)

    junk = garbage(1000)
    assert all(len(g) <= MAX_HELLO_BYTES for g in junk)
    kinds: dict[str, tuple[list[bytes], Callable[[object], bool]]] = {
        "garbage (200-4000 B)": (
            junk,
            lambda o: isinstance(o, (RemoteProtocolError, AuthenticationFailed)),
        ),
        "bad mac1": ([bad_mac1_hello()], lambda o: isinstance(o, AuthenticationFailed)),
        "valid hello (full DH)": (
            [valid_hello()],
            lambda o: isinstance(o, list) and isinstance(o[0], HandshakeComplete),
        ),
    }
    results: dict[str, dict[str, float]] = {}
    for name, (messages, expect) in kinds.items():
        measure(messages, min(n, 1000), expect)  # warm-up
        samples = measure(messages, n, expect)
        results[name] = {
            "mean_us": statistics.fmean(samples),
            "p50_us": statistics.median(samples),
            "p99_us": _p(samples, 0.99),
        }
    baseline = results["valid hello (full DH)"]["p50_us"]

    print(f"ServerConnection.receive on a first message, {n} messages per kind (µs)")
    print(f"{'first message':<24} {'mean':>9} {'p50':>9} {'p99':>9} {'p50 / valid':>12}")
    for name, r in results.items():
        ratio = r["p50_us"] / baseline
        print(
            f"{name:<24} {r['mean_us']:>9.1f} {r['p50_us']:>9.1f} {r['p99_us']:>9.1f}"
            f" {ratio:>12.3f}"
        )
    cheap = [k for k in results if not k.startswith("valid")]
    ok = all(results[k]["mean_us"] < TARGET_US for k in cheap)
    print(f"target: garbage and bad mac1 < {TARGET_US:.0f} µs mean: {'met' if ok else 'MISSED'}")

    if args.output:
        doc = {
            "benchmark": "garbage_hello",
            "iterations": n,
            "results_us": results,
            "ratio_to_valid_hello_p50": {k: results[k]["p50_us"] / baseline for k in results},
            "target_us": TARGET_US,
            "target_met": ok,
            "machine": {
                "python": sys.version.split()[0],
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
            },
        }
        args.output.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
