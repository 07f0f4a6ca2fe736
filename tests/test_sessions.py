"""Generation sessions on the server (SessionStore), their rules (protocol._state) and the
KV cache as state (KVState).

The store has no clock of its own: every test passes ``now`` explicitly, so TTL expiry is
tested without sleeping. KV caches grow through a real onnxruntime session of a tiny cache
model (``present = Concat(past, x)`` on the sequence axis), exactly as a decoder's tail
grows them on the server.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeoffload._ort import make_session
from edgeoffload.core.decoder import KVState, past_axis
from edgeoffload.core.sampling import SamplingParams
from edgeoffload.edge.sessions import SessionStore
from edgeoffload.errors import ServerBusy, SessionError, SessionLost
from edgeoffload.protocol._state import check_feed, grant_max_tokens
from edgeoffload.types import TensorSpec

HEADS, HEAD_DIM = 2, 4
PAIRS = (("past_key_values.0.key", "present.0.key"), ("past_key_values.0.value", "present.0.value"))
OWNER = b"\x01" * 32
OTHER_OWNER = b"\x02" * 32
VERSION = "0123456789abcdef"
GREEDY = SamplingParams()


SPECS = {
    name: TensorSpec(name, "float32", ("batch_size", HEADS, "past_sequence_length", HEAD_DIM))
    for name, _ in PAIRS
}
# Bytes one position adds to a cache of these specs: key and value, HEADS x HEAD_DIM float32.
BYTES_PER_TOKEN = 2 * HEADS * HEAD_DIM * 4


def _cache_model(*, value_extra: int = 0):
    """``present.k = Concat(past.k, x)`` for key and value; ``logits = ReduceSum(x)``.

    ``value_extra`` > 0 appends that many extra copies of ``x`` to the value cache only: a
    model whose value cache grows by the wrong amount (the key cache stays right).
    """
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, HEADS, "sequence_length", 4])
    inputs, outputs, nodes = [x], [], []
    for past, present in PAIRS:
        inputs.append(
            helper.make_tensor_value_info(
                past, TensorProto.FLOAT, [1, HEADS, "past_sequence_length", HEAD_DIM]
            )
        )
        outputs.append(
            helper.make_tensor_value_info(
                present, TensorProto.FLOAT, [1, HEADS, "present_sequence_length", HEAD_DIM]
            )
        )
        extra = value_extra if past.endswith(".value") else 0
        nodes.append(helper.make_node("Concat", [past, "x", *["x"] * extra], [present], axis=2))
    nodes.append(helper.make_node("ReduceSum", ["x"], ["logits"], keepdims=1))
    outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, 1, 1]))
    graph = helper.make_graph(nodes, "cache", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return make_session(model)


@pytest.fixture(scope="module")
def cache_session():
    return _cache_model()


@pytest.fixture(scope="module")
def bad_cache_session():
    return _cache_model(value_extra=1)


def _x(n: int, start: float = 0.0) -> np.ndarray:
    count = HEADS * n * HEAD_DIM
    return (np.arange(count, dtype=np.float32) + start).reshape(1, HEADS, n, HEAD_DIM)


def _kv(max_tokens: int | None = None) -> KVState:
    return KVState(PAIRS, SPECS, max_tokens=max_tokens)


def _open(store: SessionStore, now: float, *, owner: bytes = OWNER, max_tokens=None):
    return store.open(
        owner=owner,
        version=VERSION,
        sampling=GREEDY,
        make_kv=lambda: _kv(max_tokens),
        now=now,
    )


def _grow(store: SessionStore, session, n: int, runner) -> None:
    """What the server does for a prefill/step of ``n`` positions: make room, then run."""
    session.kv.check_room(n)
    store.make_room(session, n * BYTES_PER_TOKEN)
    session.kv.run(runner, {"x": _x(n)}, n)


def _get(store: SessionStore, session_id: int, now: float, **kwargs):
    kwargs.setdefault("owner", OWNER)
    kwargs.setdefault("version", VERSION)
    return store.get(session_id, now=now, **kwargs)


# -- SessionStore ---------------------------------------------------------------------------------


def test_open_gives_distinct_63_bit_ids_bound_to_owner_and_version():
    store = SessionStore()
    sessions = [_open(store, 0.0) for _ in range(50)]
    ids = [s.session_id for s in sessions]
    assert len(set(ids)) == 50
    assert all(0 <= i < 2**63 for i in ids)
    assert len(store) == 50
    s = sessions[0]
    assert (s.owner, s.version, s.sampling, s.length, s.busy) == (OWNER, VERSION, GREEDY, 0, False)
    assert _get(store, s.session_id, 1.0) is s


def test_ttl_expiry_with_injected_now():
    store = SessionStore(ttl=10.0)
    a = _open(store, 0.0)
    b = _open(store, 0.0)
    assert _get(store, a.session_id, 6.0) is a  # use renews: a.last_used = 6
    assert a.last_used == 6.0
    # At exactly ttl after its last use a session is still there; b is 10.5 s old: gone.
    store.expire(10.5)
    assert _get(store, a.session_id, 16.0) is a
    with pytest.raises(SessionLost):
        _get(store, b.session_id, 16.0)
    assert store.expired == 1 and store.evicted == 0
    with pytest.raises(SessionLost):
        _get(store, a.session_id, 26.5)  # get itself expires first
    assert len(store) == 0 and store.expired == 2


def test_ttl_spares_busy_sessions_and_open_expires_first():
    store = SessionStore(ttl=5.0)
    busy = _open(store, 0.0)
    idle = _open(store, 0.0)
    busy.busy = True
    _open(store, 100.0)  # opening expires what is stale
    assert len(store) == 2
    with pytest.raises(SessionLost):
        _get(store, idle.session_id, 100.0)
    assert _get(store, busy.session_id, 100.0) is busy  # still running: kept, and renewed
    busy.busy = False
    assert _get(store, busy.session_id, 104.0) is busy


def test_lru_eviction_keeps_the_most_recently_used(cache_session):
    store = SessionStore(budget_bytes=30 * BYTES_PER_TOKEN)
    a, b, c = (_open(store, t) for t in (0.0, 1.0, 2.0))
    for s in (a, b, c):
        _grow(store, s, 10, cache_session)
    assert store.nbytes == 30 * BYTES_PER_TOKEN and store.evicted == 0
    _get(store, a.session_id, 3.0)  # a is now the most recently used: b is the oldest
    _grow(store, c, 5, cache_session)  # needs 5 positions more than the budget has
    assert store.evicted == 1
    with pytest.raises(SessionLost):
        _get(store, b.session_id, 4.0)
    assert _get(store, a.session_id, 4.0).length == 10
    assert _get(store, c.session_id, 4.0).length == 15
    assert store.nbytes == 25 * BYTES_PER_TOKEN <= store.budget_bytes


def test_eviction_takes_as_many_as_needed_oldest_first(cache_session):
    store = SessionStore(budget_bytes=40 * BYTES_PER_TOKEN)
    sessions = [_open(store, float(t)) for t in range(4)]
    for s in sessions:
        _grow(store, s, 10, cache_session)
    newest = _open(store, 10.0)
    _grow(store, newest, 25, cache_session)  # 25 positions: three 10-position sessions go
    assert store.evicted == 3
    assert len(store) == 2
    assert _get(store, sessions[3].session_id, 11.0).length == 10
    for s in sessions[:3]:
        with pytest.raises(SessionLost):
            _get(store, s.session_id, 11.0)


def test_a_session_that_alone_exceeds_the_budget_is_refused_and_nothing_is_evicted(
    cache_session,
):
    store = SessionStore(budget_bytes=30 * BYTES_PER_TOKEN)
    other = _open(store, 0.0)
    _grow(store, other, 10, cache_session)
    big = _open(store, 1.0)
    _grow(store, big, 20, cache_session)  # exactly the budget together: fine
    with pytest.raises(SessionError) as info:
        _grow(store, big, 11, cache_session)  # 31 positions alone
    assert type(info.value) is SessionError  # refused, not "lost": the device must not replay
    assert "budget" in str(info.value)
    assert store.evicted == 0 and len(store) == 2
    assert big.length == 20 and _get(store, other.session_id, 2.0).length == 10


def test_busy_sessions_are_never_evicted(cache_session):
    store = SessionStore(budget_bytes=30 * BYTES_PER_TOKEN)
    running = _open(store, 0.0)
    _grow(store, running, 20, cache_session)
    running.busy = True
    newcomer = _open(store, 1.0)
    # Refused for now (the device may retry later), never "lost": its own session is fine.
    with pytest.raises((SessionError, ServerBusy)) as info:
        _grow(store, newcomer, 15, cache_session)
    assert not isinstance(info.value, SessionLost) and "running" in str(info.value)
    assert store.evicted == 0 and newcomer.length == 0
    running.busy = False
    _grow(store, newcomer, 15, cache_session)  # once idle, the older session makes room
    assert store.evicted == 1
    with pytest.raises(SessionLost):
        _get(store, running.session_id, 2.0)


def test_another_owner_or_version_gets_session_lost():
    store = SessionStore()
    s = _open(store, 0.0)
    with pytest.raises(SessionLost) as wrong_owner:
        _get(store, s.session_id, 1.0, owner=OTHER_OWNER)
    with pytest.raises(SessionLost):
        _get(store, s.session_id, 1.0, version="fedcba9876543210")
    with pytest.raises(SessionLost):
        store.close(s.session_id, owner=OTHER_OWNER, version=VERSION, now=1.0)
    assert _get(store, s.session_id, 2.0) is s  # untouched by the strangers
    store.close(s.session_id, owner=OWNER, version=VERSION, now=3.0)
    with pytest.raises(SessionLost) as never:
        _get(store, s.session_id, 4.0)
    # A stranger learns nothing: the same answer as for a session that does not exist.
    assert str(wrong_owner.value) == str(never.value)
    with pytest.raises(SessionLost):
        store.close(s.session_id, owner=OWNER, version=VERSION, now=5.0)
    store.drop(s.session_id)  # dropping what is gone is a no-op
    assert len(store) == 0


def test_max_sessions_evicts_the_least_recently_used_idle_one():
    store = SessionStore(max_sessions=2)
    a = _open(store, 0.0)
    b = _open(store, 1.0)
    _get(store, a.session_id, 2.0)  # b is now the least recently used
    c = _open(store, 3.0)
    assert len(store) == 2 and store.evicted == 1
    with pytest.raises(SessionLost):
        _get(store, b.session_id, 4.0)
    a.busy = c.busy = True
    with pytest.raises(SessionError) as info:
        _open(store, 5.0)
    assert type(info.value) is SessionError
    assert len(store) == 2 and store.evicted == 1


def test_a_device_exhausting_the_kv_budget_evicts_its_own_sessions_first(cache_session):
    """One device grows sessions until the budget is full, then keeps growing: the honest
    device's older session survives; the hog's own least recently used ones go."""
    store = SessionStore(budget_bytes=40 * BYTES_PER_TOKEN)
    honest = _open(store, 0.0, owner=OTHER_OWNER)  # the oldest of all: LRU alone would pick it
    _grow(store, honest, 5, cache_session)
    hog = [_open(store, 1.0 + t) for t in range(3)]
    for s in hog:
        _grow(store, s, 10, cache_session)
    assert store.nbytes == 35 * BYTES_PER_TOKEN
    _grow(store, hog[2], 12, cache_session)  # needs 7 positions beyond the budget
    assert store.evicted == 1
    assert _get(store, honest.session_id, 10.0, owner=OTHER_OWNER).length == 5
    with pytest.raises(SessionLost):
        _get(store, hog[0].session_id, 10.0)  # the hog's least recently used
    assert store.nbytes <= store.budget_bytes


def test_a_device_opening_many_sessions_evicts_its_own(cache_session):
    store = SessionStore(max_sessions=4)
    honest = _open(store, 0.0, owner=OTHER_OWNER)
    for t in range(10):
        _open(store, 1.0 + t)  # a hog opening sessions in a loop
    assert len(store) == 4 and store.evicted == 7
    assert _get(store, honest.session_id, 20.0, owner=OTHER_OWNER).session_id == honest.session_id


def test_drop_owner_removes_every_session_of_a_revoked_key():
    store = SessionStore()
    mine = [_open(store, float(t)) for t in range(3)]
    other = _open(store, 5.0, owner=OTHER_OWNER)
    assert store.drop_owner(OWNER) == 3
    for s in mine:
        with pytest.raises(SessionLost):
            _get(store, s.session_id, 6.0)
    assert _get(store, other.session_id, 6.0, owner=OTHER_OWNER) is other


# -- KVState --------------------------------------------------------------------------------------


def test_kv_state_starts_empty_on_the_past_axis():
    kv = _kv()
    assert kv.length == 0 and kv.nbytes == 0
    for name, _ in PAIRS:
        assert past_axis(SPECS[name]) == 2
        assert kv.arrays[name].shape == (1, HEADS, 0, HEAD_DIM)
        assert kv.arrays[name].dtype == np.float32


def test_kv_state_grows_by_the_positions_fed(cache_session):
    kv = _kv()
    out = kv.run(cache_session, {"x": _x(3)}, 3)
    assert set(out) == {"logits"}  # presents are kept, not returned
    assert kv.length == 3
    out = kv.run(cache_session, {"x": _x(1, start=100.0)}, 1)
    assert kv.length == 4 and kv.nbytes == 4 * BYTES_PER_TOKEN
    expected = np.concatenate([_x(3), _x(1, start=100.0)], axis=2)
    for name, _ in PAIRS:
        np.testing.assert_array_equal(kv.arrays[name], expected)
    np.testing.assert_array_equal(out["logits"], _x(1, start=100.0).sum(keepdims=True))


def test_check_room_counts_against_max_tokens(cache_session):
    kv = _kv(max_tokens=8)
    kv.check_room(8)
    with pytest.raises(SessionError):
        kv.check_room(9)
    kv.run(cache_session, {"x": _x(5)}, 5)
    kv.check_room(3)
    with pytest.raises(SessionError) as info:
        kv.check_room(4)
    assert "9" in str(info.value) and "8" in str(info.value)
    with pytest.raises(SessionError):  # run checks before it runs: nothing changes
        kv.run(cache_session, {"x": _x(4)}, 4)
    assert kv.length == 5 and kv.arrays[PAIRS[0][0]].shape[2] == 5
    _kv(max_tokens=None).check_room(10**9)  # no budget, no limit


def test_wrong_growth_is_a_session_error(cache_session):
    kv = _kv()
    kv.run(cache_session, {"x": _x(2)}, 2)
    with pytest.raises(SessionError) as info:
        kv.run(cache_session, {"x": _x(3)}, 2)  # claims 2 positions, the model adds 3
    assert "present.0.key" in str(info.value)
    assert kv.length == 2
    assert all(a.shape[2] == 2 for a in kv.arrays.values())


def test_wrong_growth_of_a_later_pair_leaves_the_state_unchanged(bad_cache_session):
    """All or nothing: after the error every array still holds ``length`` positions.

    The value cache of this model grows by twice what the key cache does; the key cache is
    checked first and is right.
    """
    kv = _kv()
    with pytest.raises(SessionError) as info:
        kv.run(bad_cache_session, {"x": _x(2)}, 2)
    assert "present.0.value" in str(info.value)
    assert kv.length == 0
    assert {name: a.shape[2] for name, a in kv.arrays.items()} == {n: 0 for n, _ in PAIRS}


# -- session rules -------------------------------------------------------------------------------


def test_grant_caps_max_tokens_at_the_server_context():
    assert grant_max_tokens(100, 4096) == 100
    assert grant_max_tokens(10_000, 4096) == 4096
    for requested, context in ((0, 4096), (5, 0)):
        with pytest.raises(SessionError, match="max_tokens must be at least 1"):
            grant_max_tokens(requested, context)


def test_feeds_continue_where_the_session_ends():
    check_feed("prefill", 7, 0, length=0, busy=False)
    check_feed("prefill", 7, 5, length=5, busy=False)  # a second prefill message
    check_feed("step", 7, 5, length=5, busy=False)
    with pytest.raises(SessionError, match="step at position 4, but session 7 holds 5 positions"):
        check_feed("step", 7, 4, length=5, busy=False)
    with pytest.raises(SessionError, match="prefill at position 6, but session 7 holds 5"):
        check_feed("prefill", 7, 6, length=5, busy=False)


def test_a_step_needs_a_prefill_and_one_feed_runs_at_a_time():
    with pytest.raises(SessionError, match="a step before any prefill of session 7"):
        check_feed("step", 7, 0, length=0, busy=False)
    with pytest.raises(SessionError, match="session 7 is already running a prefill or step"):
        check_feed("prefill", 7, 5, length=5, busy=True)
