"""PROTOCOL.md §14 on the sans-I/O connections: feature negotiation, load maps, status."""

from __future__ import annotations

import math

import msgpack
import pytest

from edgeoffload.core.noise import DEFAULT_PROTOCOL, HandshakeState
from edgeoffload.errors import LocalProtocolError, RemoteProtocolError
from edgeoffload.protocol.connection import prologue
from edgeoffload.protocol.events import RunResult, StatusReply, StatusRequest, TokenResult
from edgeoffload.protocol.load import BundleLoad, ServerLoad
from edgeoffload.protocol.wire import pack
from tests.test_protocol import (
    BUNDLE,
    RUN_TENSORS,
    SERVER_EPHEMERAL,
    SERVER_STATIC,
    VERSION,
    deliver,
    forge,
    handshake,
    make_client,
    make_server,
    one_message,
)

LOAD = ServerLoad(inflight=3, queued=1, workers=2, kv_free=4096, draining=False, tail_ms=7.5)


def _connected(features: tuple[str, ...]):
    client, server = make_client(features=features), make_server()
    handshake(client, server)
    return client, server


def test_a_device_that_asks_gets_the_features_the_server_knows():
    client, server = _connected(("x-future", "load"))
    assert client.features == server.features == ("load",)
    server.send_result(1, RUN_TENSORS, 2.0, LOAD)
    (event,) = deliver(server, client)
    assert isinstance(event, RunResult) and event.load == LOAD
    server.send_token(2, 7, 3, 42, 1.0, LOAD)
    (event,) = deliver(server, client)
    assert isinstance(event, TokenResult) and event.load == LOAD


def test_a_plain_v1_device_sees_v1_bytes():
    client, server = _connected(())
    assert client.features == server.features == ()
    server.send_result(1, RUN_TENSORS, 2.0, LOAD)  # the server offers; the connection drops it
    (ciphertext,) = server.data_to_send()
    plain = msgpack.unpackb(client.transport.decrypt(ciphertext), raw=False)
    assert list(plain) == ["t", "id", "tensors", "server_ms"]
    with pytest.raises(LocalProtocolError, match="load"):
        client.send_status(1)


def _welcome(client, payload: dict) -> bytes:
    """Message 2 written by a bare Noise responder with any payload (a lying server)."""
    message1 = one_message(client)
    envelope = msgpack.unpackb(message1, raw=False)
    responder = HandshakeState(
        DEFAULT_PROTOCOL,
        initiator=False,
        prologue=prologue(DEFAULT_PROTOCOL, BUNDLE),
        s=SERVER_STATIC,
        e=SERVER_EPHEMERAL,
    )
    responder.read_message(envelope["noise"])
    return pack({"v": 1, "noise": responder.write_message(pack(payload))})


WELCOME = {"ok": True, "version": VERSION, "max_message": 1 << 20, "agent": "liar"}


@pytest.mark.parametrize(
    ("features", "error"),
    [
        (["status-now"], "did not ask"),
        (["load", "load"], "twice"),
        ([7], "short string"),
        (["x" * 65], "short string"),
        ([f"f{i}" for i in range(17)], "at most 16"),
    ],
)
def test_the_device_rejects_a_welcome_granting_what_it_did_not_ask(features, error):
    client = make_client(features=("load",))
    client.start()
    with pytest.raises(RemoteProtocolError, match=error):
        client.receive(_welcome(client, {**WELCOME, "features": features}))


def test_a_hello_with_a_malformed_feature_list_is_refused():
    client = make_client(features=("load",))
    client.requested_features = ("load", "load")  # what a broken port might send
    client.start()
    with pytest.raises(RemoteProtocolError, match="twice"):
        make_server().receive(one_message(client))


GOOD = LOAD.to_wire()


@pytest.mark.parametrize(
    "load",
    [
        {**GOOD, "inflight": -1},
        {**GOOD, "queued": 4},  # more queued than in flight
        {**GOOD, "workers": 0},
        {**GOOD, "inflight": 2**31},
        {**GOOD, "tail_ms": math.nan},
        {**GOOD, "tail_ms": math.inf},
        {**GOOD, "tail_ms": -1.0},
        {**GOOD, "tail_ms": True},
        {**GOOD, "draining": 0},
        {**GOOD, "kv_free": 1.5},
        {**GOOD, "extra": 1},
        {k: v for k, v in GOOD.items() if k != "workers"},
        [1, 2, 3],
    ],
)
def test_garbage_load_reports_are_protocol_errors(load):
    client, server = _connected(("load",))
    message = {"t": "result", "id": 1, "tensors": [], "server_ms": 1.0, "load": load}
    with pytest.raises(RemoteProtocolError, match="load"):
        client.receive(forge(server, message))


def test_a_load_report_nobody_asked_for_is_a_protocol_error():
    client, server = _connected(())
    message = {"t": "result", "id": 1, "tensors": [], "server_ms": 1.0, "load": GOOD}
    with pytest.raises(RemoteProtocolError, match="not negotiated"):
        client.receive(forge(server, message))


def test_status_round_trip():
    client, server = _connected(("load",))
    client.send_status(9)
    (request,) = deliver(client, server)
    assert request == StatusRequest(9)
    bundles = [BundleLoad(BUNDLE, VERSION, 2, 3.25), BundleLoad(BUNDLE, "fedcba9876543210", 0)]
    server.send_status(9, LOAD, bundles)
    (reply,) = deliver(server, client)
    assert reply == StatusReply(9, LOAD, tuple(bundles))


def test_status_without_the_feature_is_refused_by_the_server():
    client, server = _connected(())
    with pytest.raises(RemoteProtocolError, match="not negotiated"):
        server.receive(forge(client, {"t": "status", "id": 1}))


@pytest.mark.parametrize(
    "bundles",
    [
        [{"identity": "", "version": VERSION, "inflight": 0}],
        [{"identity": BUNDLE, "version": VERSION, "inflight": -2}],
        [{"identity": BUNDLE, "version": VERSION}],
        ["not a map"],
        [{"identity": BUNDLE, "version": VERSION, "inflight": 0}] * 65,
    ],
)
def test_garbage_status_bundles_are_protocol_errors(bundles):
    client, server = _connected(("load",))
    message = {"t": "status", "id": 1, "load": GOOD, "bundles": bundles}
    with pytest.raises(RemoteProtocolError, match="status"):
        client.receive(forge(server, message))
