"""Announce an edge server on the local network over mDNS/DNS-SD (``serve --advertise``).

A device on the same link finds servers without being told their address: the server
registers one ``_edgeoffload._tcp.local.`` service whose SRV/A records give the address and
port it listens on and whose TXT record says what a device needs to choose it before
connecting:

====== ==============================================================================
key    value
====== ==============================================================================
v      protocol version spoken (decimal, ``protocol.connection.PROTOCOL_VERSION``)
fp     fingerprint of the server's public key (``keys.fingerprint``: "abcd-efgh-ijkl-mnop")
bundles  the bundle versions served, sorted, comma-separated (cut to fit one TXT string)
nb     how many bundles are served (larger than the ``bundles`` list when it was cut)
====== ==============================================================================

An announcement is a hint, never trust: anyone on the link can announce anything. It carries
only the key's fingerprint, which lets a device pick, among the servers it hears, those whose
key it already pinned; the Noise IK handshake with that pinned key is what authenticates. The
public key itself is not announced, so that nobody is tempted to trust a key because it was
announced.

A server announces itself where it listens: bound to one address, it announces that address on
that interface only (a server on 127.0.0.1 is not announced to the LAN); bound to the wildcard
(``0.0.0.0`` or ``::``), it announces the addresses of every interface. On stop it sends
goodbye packets (TTL 0), so browsers drop it before its records would expire.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Iterable
from types import TracebackType

import ifaddr
from zeroconf import InterfaceChoice, IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from edgeoffload.errors import EdgeOffloadError, UsageError
from edgeoffload.keys import check_key_bytes, fingerprint
from edgeoffload.protocol.connection import PROTOCOL_VERSION

__all__ = [
    "SERVICE_TYPE",
    "TXT_LIMIT",
    "Advertiser",
    "advertised_addresses",
    "instance_name",
    "txt_properties",
]

log = logging.getLogger("edgeoffload.edge.advertise")

SERVICE_TYPE = "_edgeoffload._tcp.local."
# DNS-SD limits: one TXT string is at most 255 bytes (RFC 6763 6.1), and the whole record is
# kept well under a 1500-byte MTU so an announcement fits one unfragmented packet with its
# SRV and address records.
TXT_STRING_LIMIT = 255
TXT_LIMIT = 1300
# A DNS label (the instance name) is at most 63 bytes.
_LABEL_LIMIT = 63
_HOST_LABEL_LIMIT = 32
# A bundle version as it appears on the wire: manifest versions are 16 hex digits; anything
# that could break the comma-separated list is refused.
_BUNDLE_VERSION = re.compile(r"[0-9a-z]{1,64}")
_WILDCARD_V4 = ("", "0.0.0.0")
_WILDCARD_V6 = ("::",)
_MULTICAST_HINT = (
    "an interface must be up, with an address and multicast on (ip link set DEV up multicast on)"
)
# Bounds on the network calls: probing + three announcements take about 1.5 s, goodbyes 0.4 s.
_REGISTER_TIMEOUT = 10.0
_UNREGISTER_TIMEOUT = 5.0


def txt_properties(
    public_key: bytes, bundles: Iterable[str], *, protocol: int = PROTOCOL_VERSION
) -> dict[str, str]:
    """The TXT record of a server: ``v``, ``fp``, ``bundles`` and ``nb`` (see the module doc).

    The bundle versions are sorted and as many as fit in one 255-byte TXT string are listed
    (14 manifest versions); the rest are cut, and ``nb`` tells a device that the list is
    incomplete (it may then try the server anyway; the handshake names the bundle).

    Raises:
        UsageError: ``public_key`` is not 32 bytes, or a bundle version is not a short
            lowercase alphanumeric string.
    """
    versions = sorted(set(bundles))
    for version in versions:
        if not _BUNDLE_VERSION.fullmatch(version):
            raise UsageError(
                f"bundle version {version!r} cannot be announced",
                hint="bundle versions are the manifest's 16 lowercase hex digits",
            )
    listed: list[str] = []
    room = TXT_STRING_LIMIT - len("bundles=")
    for version in versions:
        cost = len(version) + (1 if listed else 0)
        if cost > room:
            break
        listed.append(version)
        room -= cost
    if len(listed) < len(versions):
        log.warning(
            "announcing %d of %d bundle versions (one TXT string holds 255 bytes); "
            "devices see nb=%d and may still try this server for the others",
            len(listed),
            len(versions),
            len(versions),
        )
    properties = {
        "v": str(protocol),
        "fp": fingerprint(check_key_bytes(public_key, "server public key")),
        "bundles": ",".join(listed),
        "nb": str(len(versions)),
    }
    assert _txt_size(properties) < TXT_LIMIT  # 4 strings of at most 255 bytes each
    return properties


def _txt_size(properties: dict[str, str]) -> int:
    return sum(1 + len(f"{key}={value}".encode()) for key, value in properties.items())


def instance_name(port: int, public_key: bytes, *, hostname: str | None = None) -> str:
    """A unique, readable instance label: ``<host>-<port>-<two fingerprint groups>``.

    Two servers on one machine differ by port, two machines by host name, and a key change
    gives a new name (so a browser never mixes the TXT of an old key with a new one).
    """
    host = hostname if hostname is not None else socket.gethostname()
    label = re.sub(r"[^A-Za-z0-9-]+", "-", host.split(".")[0]).strip("-")[:_HOST_LABEL_LIMIT]
    fp = fingerprint(check_key_bytes(public_key, "server public key"))
    name = f"{label or 'edgeoffload'}-{port}-{fp[:9]}"
    assert len(name.encode()) <= _LABEL_LIMIT
    return name


def advertised_addresses(host: str) -> tuple[list[str], list[str] | InterfaceChoice, IPVersion]:
    """Where a server bound to ``host`` is announced: (addresses, interfaces, IP version).

    A specific address is announced on its own interface only; the wildcard is announced on
    every interface with every (non-loopback, when there are others) address.

    Raises:
        UsageError: ``host`` is a name rather than an address (announcements carry addresses,
            and the name may resolve differently for the devices).
        EdgeOffloadError: ``host`` is the wildcard and no interface has an address.
    """
    if host in _WILDCARD_V4 or host in _WILDCARD_V6:
        v6 = host in _WILDCARD_V6
        addresses = _interface_addresses(v6=v6)
        if not addresses:
            raise EdgeOffloadError("no interface has an address to announce", hint=_MULTICAST_HINT)
        return addresses, InterfaceChoice.All, IPVersion.All if v6 else IPVersion.V4Only
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(
            f"--advertise needs --host to be an IP address or 0.0.0.0, not {host!r}",
            hint="bind an address (e.g. --host 0.0.0.0) so that it can be announced",
        ) from None
    return [str(ip)], [str(ip)], IPVersion.V6Only if ip.version == 6 else IPVersion.V4Only


def _interface_addresses(*, v6: bool) -> list[str]:
    """Addresses of this machine's interfaces, loopback ones only if there is nothing else."""
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for adapter in ifaddr.get_adapters():
        for entry in adapter.ips:
            if entry.is_IPv4:
                found.append(ipaddress.IPv4Address(entry.ip))
            elif v6:
                ip6 = ipaddress.IPv6Address(entry.ip[0])
                if not ip6.is_link_local:  # needs a scope id a URL cannot carry portably
                    found.append(ip6)
    usable = [ip for ip in found if not ip.is_loopback] or found
    return sorted({str(ip) for ip in usable})


class Advertiser:
    """Registers one ``_edgeoffload._tcp.local.`` service for a running server.

    Use as ``async with Advertiser(...)`` or call :meth:`start` and :meth:`stop`. ``port`` is
    the port the server actually listens on (``EdgeServer.port``, not 0).
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        public_key: bytes,
        bundles: Iterable[str],
        hostname: str | None = None,
    ) -> None:
        if not 0 < port < 65536:
            raise UsageError(f"cannot announce port {port}", hint="pass the port the server got")
        self.host = host
        self.port = port
        self.fingerprint = fingerprint(check_key_bytes(public_key, "server public key"))
        self.properties = txt_properties(public_key, bundles)
        self.addresses, self._interfaces, self._ip_version = advertised_addresses(host)
        label = instance_name(port, public_key, hostname=hostname)
        self._info = ServiceInfo(
            SERVICE_TYPE,
            f"{label}.{SERVICE_TYPE}",
            port=port,
            properties=self.properties,
            server=f"{label}.local.",
            parsed_addresses=self.addresses,
        )
        self._zeroconf: AsyncZeroconf | None = None

    @property
    def name(self) -> str:
        """The announced instance name (zeroconf renames it if another responder has it)."""
        return self._info.name.removesuffix("." + SERVICE_TYPE)

    async def start(self) -> None:
        """Probe for the name, then announce (about 1.5 s); returns once announced.

        Raises:
            EdgeOffloadError: mDNS sockets cannot be opened on these interfaces, or the
                registration did not finish in time.
        """
        if self._zeroconf is not None:
            return
        try:
            zc = AsyncZeroconf(interfaces=self._interfaces, ip_version=self._ip_version)
        except (OSError, RuntimeError) as exc:  # RuntimeError: no interface with an address
            raise EdgeOffloadError(
                f"cannot start mDNS on {self.host}: {getattr(exc, 'strerror', None) or exc}",
                hint=_MULTICAST_HINT,
            ) from exc
        try:
            announced = await asyncio.wait_for(
                zc.async_register_service(self._info, allow_name_change=True), _REGISTER_TIMEOUT
            )
            await asyncio.wait_for(announced, _REGISTER_TIMEOUT)
        except (asyncio.TimeoutError, OSError) as exc:
            await zc.async_close()
            raise EdgeOffloadError(
                f"announcing the server over mDNS failed: {str(exc) or 'timed out'}",
                hint="run without --advertise, or check that multicast works on this network",
            ) from exc
        self._zeroconf = zc
        log.info(
            "announced %s on mDNS: %s port %d, key %s, %s bundle(s)",
            self.name,
            ", ".join(self.addresses),
            self.port,
            self.fingerprint,
            self.properties["nb"],
        )

    async def stop(self) -> None:
        """Send goodbye packets and close the mDNS sockets (bounded; idempotent)."""
        zc, self._zeroconf = self._zeroconf, None
        if zc is None:
            return
        try:
            goodbye = await asyncio.wait_for(
                zc.async_unregister_service(self._info), _UNREGISTER_TIMEOUT
            )
            await asyncio.wait_for(goodbye, _UNREGISTER_TIMEOUT)
        except (asyncio.TimeoutError, OSError) as exc:  # records then expire by their TTL
            log.warning("mDNS goodbye for %s not sent: %s", self.name, str(exc) or "timed out")
        finally:
            await zc.async_close()
        log.info("withdrew %s from mDNS", self.name)

    async def __aenter__(self) -> Advertiser:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
