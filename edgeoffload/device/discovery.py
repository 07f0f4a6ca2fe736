"""Find edge servers on the local network over mDNS/DNS-SD, and keep the ones already trusted.

Discovery finds addresses, never trust. Anyone on the link can announce an
``_edgeoffload._tcp`` service with any TXT record, so what :func:`discover` returns is a list of
candidates: where a server says it listens, the fingerprint of the key it says it has, the
bundles and protocol version it says it serves. :func:`trusted` keeps those whose fingerprint
matches a server key the device pinned beforehand (from ``edgeoffload keys show`` on the
server, copied out of band) and pairs each address with that pinned key, never with anything
announced. The Noise IK handshake with the pinned key is what authenticates: a spoofed
announcement that copies a trusted fingerprint but points at a server with another key fails
the handshake with :class:`~edgeoffload.errors.AuthenticationFailed`.

The record format (service type, TXT keys ``v``, ``fp``, ``bundles``, ``nb``) is written by
``edgeoffload.edge.advertise``; this module parses it strictly and skips, with a debug log,
any announcement it cannot parse, so a malformed or hostile record never stops a browse.

zeroconf is pure Python (plus ifaddr), which keeps the device install light.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from edgeoffload.errors import EdgeOffloadError, UsageError
from edgeoffload.keys import check_key_bytes, fingerprint
from edgeoffload.protocol.connection import PROTOCOL_VERSION

__all__ = [
    "MAX_TIMEOUT",
    "SERVICE_TYPE",
    "DiscoveredServer",
    "discover",
    "parse_service",
    "trusted",
]

log = logging.getLogger("edgeoffload.device.discovery")

SERVICE_TYPE = "_edgeoffload._tcp.local."  # the same string as edgeoffload.edge.advertise
MAX_TIMEOUT = 60.0
_FINGERPRINT = re.compile(r"[a-z2-7]{4}(?:-[a-z2-7]{4}){3}")
_BUNDLE_VERSION = re.compile(r"[0-9a-z]{1,64}")
_DECIMAL = re.compile(r"[0-9]{1,9}")
_MULTICAST_HINT = (
    "an interface must be up, with an address and multicast on (ip link set DEV up multicast on)"
)


@dataclass(frozen=True)
class DiscoveredServer:
    """One announced edge server, as announced: a candidate, not a trusted server.

    ``bundles_complete`` is False when the server serves more bundles than its TXT record
    could list (``nb`` larger than ``bundles``).
    """

    name: str  # instance label, e.g. "edge1-8765-mfrg-gzdf"
    url: str  # "ws://ADDR:PORT"
    fingerprint: str  # of the key the server claims to have
    bundles: tuple[str, ...]
    protocol: int
    bundles_complete: bool = True


def parse_service(
    name: str,
    addresses: Sequence[str],
    port: int | None,
    properties: Mapping[bytes, bytes | None],
) -> DiscoveredServer | None:
    """The server an announcement describes, or None (debug log) when it is malformed.

    ``name`` is the full service name; ``addresses`` the parsed A/AAAA records; ``properties``
    the raw TXT key/value bytes. The URL uses the first IPv4 address, else the first global
    IPv6 one.
    """
    label = name.removesuffix("." + SERVICE_TYPE)
    try:
        return _parse(label, addresses, port, properties)
    except ValueError as exc:
        log.debug("skipping announcement %r: %s", label, exc)
        return None


def _parse(
    label: str,
    addresses: Sequence[str],
    port: int | None,
    properties: Mapping[bytes, bytes | None],
) -> DiscoveredServer:
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"bad port {port!r}")
    txt: dict[str, str] = {}
    for key, value in properties.items():
        if value is None:
            continue  # a boolean attribute: none of ours
        try:
            txt[key.decode("ascii")] = value.decode("ascii")
        except (UnicodeDecodeError, AttributeError):
            raise ValueError("TXT record is not ASCII") from None
    for required in ("v", "fp", "nb"):
        if required not in txt:
            raise ValueError(f"TXT record has no {required!r}")
    if not _DECIMAL.fullmatch(txt["v"]) or not _DECIMAL.fullmatch(txt["nb"]):
        raise ValueError("v and nb must be decimal integers")
    if not _FINGERPRINT.fullmatch(txt["fp"]):
        raise ValueError("fp is not a key fingerprint")
    bundles = tuple(txt.get("bundles", "").split(",")) if txt.get("bundles") else ()
    if not all(_BUNDLE_VERSION.fullmatch(b) for b in bundles):
        raise ValueError("bundles is not a comma-separated list of bundle versions")
    count = int(txt["nb"])
    if count < len(bundles):
        raise ValueError(f"nb={count} but {len(bundles)} bundles listed")
    return DiscoveredServer(
        name=label,
        url=f"ws://{_host(addresses)}:{port}",
        fingerprint=txt["fp"],
        bundles=bundles,
        protocol=int(txt["v"]),
        bundles_complete=count == len(bundles),
    )


def _host(addresses: Sequence[str]) -> str:
    parsed: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for text in addresses:
        try:
            parsed.append(ipaddress.ip_address(text))
        except ValueError:
            continue  # a scoped (link-local) IPv6 address: no portable URL form
    for ip in parsed:
        if ip.version == 4:
            return str(ip)
    for ip in parsed:
        if not ip.is_link_local:
            return f"[{ip}]"
    raise ValueError("no usable address")


async def discover(
    timeout: float = 2.0,
    *,
    interfaces: Sequence[str] | InterfaceChoice = InterfaceChoice.All,
) -> list[DiscoveredServer]:
    """Browse for edge servers for ``timeout`` seconds and return what they announced.

    Browsing cannot know when every server has answered, so this always takes ``timeout``
    (servers answering later are missed: pass a longer one on a slow network). The result is
    sorted by name and holds only well-formed announcements; filter it with :func:`trusted`.

    Args:
        timeout: seconds to listen, more than 0 and at most 60.
        interfaces: zeroconf's choice of interfaces (``InterfaceChoice.All``, or addresses).

    Raises:
        UsageError: ``timeout`` out of range.
        EdgeOffloadError: mDNS sockets cannot be opened (no multicast on these interfaces).
    """
    if not 0 < timeout <= MAX_TIMEOUT:
        raise UsageError(f"discovery timeout must be in (0, {MAX_TIMEOUT:g}] s, got {timeout}")
    try:
        azc = AsyncZeroconf(interfaces=interfaces)
    except (OSError, RuntimeError) as exc:  # RuntimeError: no interface with an address
        raise EdgeOffloadError(
            f"cannot browse mDNS: {getattr(exc, 'strerror', None) or exc}",
            hint=_MULTICAST_HINT,
        ) from exc
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    found: dict[str, DiscoveredServer] = {}
    alive: set[str] = set()
    tasks: set[asyncio.Task[None]] = set()

    async def resolve(name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        remaining_ms = (deadline - loop.time()) * 1000
        if remaining_ms <= 0 or not await info.async_request(azc.zeroconf, remaining_ms):
            log.debug("no SRV/TXT/address answer for %r in time", name)
            return
        server = parse_service(
            name, info.parsed_addresses(IPVersion.All), info.port, info.properties
        )
        if server is not None and name in alive:
            found[name] = server

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:  # a goodbye packet
            alive.discard(name)
            found.pop(name, None)
            return
        alive.add(name)
        task = asyncio.ensure_future(resolve(name))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    browser = AsyncServiceBrowser(azc.zeroconf, SERVICE_TYPE, handlers=[on_change])
    try:
        await asyncio.sleep(timeout)
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await browser.async_cancel()
        await azc.async_close()
    return sorted(found.values(), key=lambda s: s.name)


def trusted(
    found: Iterable[DiscoveredServer],
    server_keys: Mapping[str, bytes] | Iterable[bytes],
    *,
    bundle: str | None = None,
    protocol: int | None = PROTOCOL_VERSION,
) -> list[tuple[str, bytes]]:
    """``(url, pinned public key)`` of each discovered server whose key the device trusts.

    A server is kept when its announced fingerprint is that of one of ``server_keys`` (the
    pinned keys: a sequence of 32-byte public keys, or a mapping fingerprint -> key), it
    speaks ``protocol`` (None: any), and, with ``bundle``, it lists that bundle version (or
    its list was cut, so it may serve it). The key returned is always the pinned one: connect
    with it, and the handshake proves the server holds it.

    Raises:
        UsageError: a pinned key is not 32 bytes, or a mapping's fingerprint is not its key's.
    """
    pinned: dict[str, bytes] = {}
    if isinstance(server_keys, (bytes, bytearray, memoryview)):
        raise UsageError(
            "server_keys must be a sequence of public keys, not one key",
            hint="pass [key] to trust a single server key",
        )
    if isinstance(server_keys, Mapping):
        for fp, key in server_keys.items():
            raw = check_key_bytes(key, "pinned server key")
            if fingerprint(raw) != fp:
                raise UsageError(
                    f"pinned key {fingerprint(raw)} is listed under fingerprint {fp!r}",
                    hint="map each fingerprint to its own key (keys.fingerprint(key))",
                )
            pinned[fp] = raw
    else:
        for key in server_keys:
            raw = check_key_bytes(key, "pinned server key")
            pinned[fingerprint(raw)] = raw
    kept: list[tuple[str, bytes]] = []
    for server in found:
        key = pinned.get(server.fingerprint)
        if key is None:
            log.debug("ignoring %s at %s: key %s not trusted", *_who(server))
        elif protocol is not None and server.protocol != protocol:
            log.debug("ignoring %s at %s (key %s): protocol %d", *_who(server), server.protocol)
        elif bundle is not None and bundle not in server.bundles and server.bundles_complete:
            log.debug("ignoring %s at %s (key %s): does not serve %s", *_who(server), bundle)
        else:
            kept.append((server.url, key))
    return kept


def _who(server: DiscoveredServer) -> tuple[Any, ...]:
    return server.name, server.url, server.fingerprint
