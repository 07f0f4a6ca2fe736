"""Tests for edgeoffload.edge.allowlist: content-based reloads that fail closed, quotas."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest

from edgeoffload.edge.allowlist import AllowList
from edgeoffload.errors import UsageError
from edgeoffload.keys import PUBLIC_FILE, KeyPair, encode_public

LOGGER = "edgeoffload.edge.allowlist"


def _pub(n: int) -> bytes:
    """A distinct, deterministic public key."""
    return KeyPair.from_private(hashlib.sha256(b"allowlist-key-%d" % n).digest()).public


def _k(n: int) -> str:
    return encode_public(_pub(n))


class FakeClock:
    """A monotonic clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float = 0.5) -> None:
        self.now += seconds


def _lines(*lines: str) -> str:
    return "\n".join(lines) + "\n"


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]


def _no_key_text_logged(caplog: pytest.LogCaptureFixture, *ns: int) -> None:
    for record in caplog.records:
        for n in ns:
            assert _k(n) not in record.getMessage()


def _rewrite_keeping_stat(path: Path, text: str) -> None:
    """Rewrite ``path`` in place with same-size content, then put its mtime back."""
    before = path.stat()
    data = text.encode()
    assert len(data) == before.st_size, "the test needs same-size content"
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )


# --------------------------------------------------------------------------- file source


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _file(tmp_path: Path, *lines: str) -> Path:
    f = tmp_path / "authorized_keys"
    f.write_text(_lines(*lines))
    return f


def test_default_interval_is_half_a_second(tmp_path: Path, clock: FakeClock) -> None:
    f = _file(tmp_path, _k(1), _k(2))
    allow = AllowList(f, clock=clock)
    assert allow.check_interval == 0.5
    f.write_text(_lines(_k(2)))
    clock.tick(0.4)
    assert allow.allows(_pub(1))  # not due yet
    clock.tick(0.1)
    assert not allow.allows(_pub(1))


def test_clean_edit_revokes(tmp_path: Path, clock: FakeClock) -> None:
    f = _file(tmp_path, f"{_k(1)} alice", f"{_k(2)} bob")
    allow = AllowList(f, clock=clock)
    assert allow.generation == 0
    f.write_text(_lines(f"{_k(2)} bob", f"{_k(3)} carol"))
    clock.tick()
    assert allow.check() is True
    assert not allow.allows(_pub(1))
    assert allow.allows(_pub(2)) and allow.allows(_pub(3))
    assert allow.label(_pub(3)) == "carol"
    assert allow.generation == 1
    clock.tick()
    assert allow.check() is False  # nothing changed since
    assert allow.generation == 1


def test_malformed_edit_keeps_only_the_intersection(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    f = _file(tmp_path, f"{_k(1)} one", f"{_k(2)} two", f"{_k(3)} three")
    allow = AllowList(f, clock=clock)
    # One edit: revoke 1, add 4, and a typo on line 4.
    f.write_text(_lines(f"{_k(2)} two", f"{_k(3)} three", f"{_k(4)} four", "x25519:typo"))
    clock.tick()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert allow.check() is True
    assert not allow.allows(_pub(1))  # revoked by the same edit: revoked
    assert not allow.allows(_pub(4))  # new in a broken edit: not admitted
    assert allow.allows(_pub(2)) and allow.allows(_pub(3))  # untouched: still allowed
    assert len(allow) == 2
    assert allow.generation == 1
    errors = _errors(caplog)
    assert len(errors) == 1
    assert f"{f}:4:" in errors[0]
    _no_key_text_logged(caplog, 1, 2, 3, 4)

    # The same broken content is not logged again ...
    caplog.clear()
    clock.tick()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert allow.check() is False
    assert not caplog.records
    # ... but an explicit reload reports it (and still fails closed).
    with pytest.raises(UsageError) as info:
        allow.reload()
    assert f"{f}:4:" in info.value.message
    assert not allow.allows(_pub(4)) and len(allow) == 2
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert allow.try_reload() is False
    assert any(f"{f}:4:" in m for m in _errors(caplog))

    # Fixing the file admits the new key.
    f.write_text(_lines(f"{_k(2)} two", f"{_k(3)} three", f"{_k(4)} four"))
    clock.tick()
    assert allow.check() is True
    assert allow.allows(_pub(4)) and allow.label(_pub(4)) == "four"
    assert not allow.allows(_pub(1))


def test_successive_broken_edits_only_narrow(tmp_path: Path, clock: FakeClock) -> None:
    f = _file(tmp_path, _k(1), _k(2))
    allow = AllowList(f, clock=clock)
    f.write_text(_lines(_k(2), "junk"))
    clock.tick()
    assert allow.check() is True
    assert allow.entries().keys() == {_pub(2)}
    # Another broken edit that re-lists 1: the intersection is with what is installed now.
    f.write_text(_lines(_k(1), _k(2), "more junk"))
    clock.tick()
    assert allow.check() is False
    assert allow.entries().keys() == {_pub(2)}
    # A broken line that was a key's only line revokes that key.
    f.write_text(_lines(_k(1), _k(2) + " quota=zero"))
    clock.tick()
    assert allow.check() is True
    assert len(allow) == 0


def test_non_utf8_content_is_malformed(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    f = _file(tmp_path, _k(1), f"{_k(2)} bob")
    allow = AllowList(f, clock=clock)
    f.write_bytes(_lines(_k(1), _k(3)).encode() + f"{_k(2)} b\xf6b\n".encode("latin-1"))
    clock.tick()
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        allow.check()
    assert allow.allows(_pub(1))
    assert not allow.allows(_pub(2))  # its line is not UTF-8
    assert not allow.allows(_pub(3))  # new in a broken edit
    assert any(f"{f}:3: not UTF-8" in m for m in _errors(caplog))


def test_deleted_file_admits_nobody_until_restored(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    f = _file(tmp_path, _k(1), _k(2))
    allow = AllowList(f, clock=clock)
    content = f.read_text()
    f.unlink()
    clock.tick()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert allow.check() is True
        assert not allow.allows(_pub(1)) and not allow.allows(_pub(2))
        assert len(allow) == 0
        assert allow.generation == 1
        for _ in range(3):  # still missing: no new log, no new generation
            clock.tick()
            assert allow.check() is False
    errors = _errors(caplog)
    assert len(errors) == 1
    assert str(f) in errors[0] and "NO DEVICE WILL BE ADMITTED" in errors[0]
    with pytest.raises(UsageError, match="does not exist"):
        allow.reload()
    assert len(allow) == 0

    f.write_text(content)
    clock.tick()
    assert allow.check() is True
    assert allow.allows(_pub(1)) and allow.allows(_pub(2))
    assert allow.generation == 2

    # A second disappearance is a new state: logged again.
    caplog.clear()
    f.unlink()
    clock.tick()
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert not allow.allows(_pub(1))
    assert len(_errors(caplog)) == 1


def test_restored_but_malformed_file_admits_nobody(tmp_path: Path, clock: FakeClock) -> None:
    f = _file(tmp_path, _k(1))
    allow = AllowList(f, clock=clock)
    f.unlink()
    clock.tick()
    assert allow.check() is True and len(allow) == 0
    f.write_text(_lines(_k(1), "junk"))  # intersection with the empty list
    clock.tick()
    assert allow.check() is False
    assert not allow.allows(_pub(1))
    f.write_text(_lines(_k(1)))
    clock.tick()
    assert allow.allows(_pub(1))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_unreadable_source_admits_nobody(tmp_path: Path, clock: FakeClock) -> None:
    f = _file(tmp_path, _k(1))
    allow = AllowList(f, clock=clock)
    f.unlink()
    os.mkfifo(f)  # neither a file nor a folder; opening it must not hang either
    clock.tick()
    assert not allow.allows(_pub(1))
    with pytest.raises(UsageError, match="cannot read"):
        allow.reload()


def test_same_size_same_mtime_rewrite_is_detected(tmp_path: Path, clock: FakeClock) -> None:
    f = _file(tmp_path, f"{_k(1)} dev", f"{_k(2)} dev")
    allow = AllowList(f, clock=clock)
    _rewrite_keeping_stat(f, _lines(f"{_k(3)} dev", f"{_k(2)} dev"))
    clock.tick()
    assert allow.check() is True
    assert not allow.allows(_pub(1))
    assert allow.allows(_pub(3)) and allow.allows(_pub(2))


def test_reload_forces_a_check_and_try_reload_reports_success(
    tmp_path: Path, clock: FakeClock
) -> None:
    f = _file(tmp_path, _k(1))
    allow = AllowList(f, check_interval=3600.0, clock=clock)
    f.write_text(_lines(_k(2)))
    clock.tick(10)
    assert allow.allows(_pub(1))  # not due
    allow.reload()
    assert allow.allows(_pub(2)) and not allow.allows(_pub(1))
    f.write_text(_lines(_k(3)))
    assert allow.try_reload() is True
    assert allow.entries() == {_pub(3): None}
    assert allow.generation == 2


# --------------------------------------------------------------------------- folder source


def _folder(tmp_path: Path, **files: str) -> Path:
    d = tmp_path / "devices"
    d.mkdir()
    for name, text in files.items():
        (d / f"{name}.pub").write_text(text + "\n")
    return d


def test_folder_clean_edit_revokes(tmp_path: Path, clock: FakeClock) -> None:
    d = _folder(tmp_path, a=_k(1), b=_k(2))
    allow = AllowList(d, clock=clock)
    (d / "a.pub").unlink()
    (d / "c.pub").write_text(_k(3) + "\n")
    clock.tick()
    assert allow.check() is True
    assert not allow.allows(_pub(1))
    assert allow.allows(_pub(3)) and allow.label(_pub(3)) == "c"
    # Replacing the key inside a file revokes the old key.
    (d / "b.pub").write_text(_k(4) + "\n")
    clock.tick()
    assert not allow.allows(_pub(2)) and allow.label(_pub(4)) == "b"
    assert allow.generation == 2


def test_folder_malformed_edit_keeps_only_the_intersection(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    d = _folder(tmp_path, a=_k(1), b=_k(2), c=_k(3), e=_k(6))
    allow = AllowList(d, clock=clock)
    (d / "a.pub").unlink()  # revoke 1
    (d / "b.pub").write_text(_lines(_k(2), _k(5)))  # two keys: malformed
    (d / "d.pub").write_text(_k(4) + "\n")  # a new device
    (d / "e.pub").write_text("x25519:garbage\n")  # 6's only line is broken
    clock.tick()
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert allow.check() is True
    assert not allow.allows(_pub(1))
    assert not allow.allows(_pub(4)) and not allow.allows(_pub(5))
    assert not allow.allows(_pub(6))
    assert allow.allows(_pub(2)) and allow.allows(_pub(3))
    errors = _errors(caplog)
    assert len(errors) == 1
    assert f"{d / 'b.pub'}: a key file must contain exactly one public key" in errors[0]
    assert f"{d / 'e.pub'}:1:" in errors[0]
    _no_key_text_logged(caplog, 1, 2, 3, 4, 5, 6)

    (d / "b.pub").write_text(_k(2) + "\n")
    (d / "e.pub").write_text(_k(6) + "\n")
    clock.tick()
    assert all(allow.allows(_pub(n)) for n in (2, 3, 4, 6))


def test_folder_emptied_key_file_is_malformed_and_revokes(tmp_path: Path, clock: FakeClock) -> None:
    d = _folder(tmp_path, a=_k(1), b=_k(2))
    allow = AllowList(d, clock=clock)
    (d / "a.pub").write_text("# revoked\n")
    clock.tick()
    with pytest.raises(UsageError, match="exactly one public key, found 0"):
        allow.reload()
    assert allow.entries().keys() == {_pub(2)}
    assert not allow.allows(_pub(1))


def test_folder_deleted_admits_nobody_until_restored(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    d = _folder(tmp_path, a=_k(1))
    allow = AllowList(d, clock=clock)
    (d / "a.pub").unlink()
    d.rmdir()
    clock.tick()
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert not allow.allows(_pub(1))
        clock.tick()
        assert not allow.allows(_pub(1))
    errors = _errors(caplog)
    assert len(errors) == 1 and "NO DEVICE WILL BE ADMITTED" in errors[0]
    d.mkdir()
    (d / "a.pub").write_text(_k(1) + "\n")
    clock.tick()
    assert allow.allows(_pub(1)) and allow.label(_pub(1)) == "a"


def test_folder_same_size_same_mtime_rewrite_is_detected(tmp_path: Path, clock: FakeClock) -> None:
    d = _folder(tmp_path, a=_k(1), b=_k(2))
    allow = AllowList(d, clock=clock)
    dir_mtime = d.stat().st_mtime_ns
    _rewrite_keeping_stat(d / "a.pub", _k(3) + "\n")
    assert d.stat().st_mtime_ns == dir_mtime  # an in-place rewrite leaves the folder alone
    clock.tick()
    assert allow.check() is True
    assert not allow.allows(_pub(1)) and allow.allows(_pub(3))


def test_folder_quota(tmp_path: Path, clock: FakeClock) -> None:
    d = _folder(tmp_path, a=f"{_k(1)} quota=3", b=f"{_k(2)} quota=4 bob-laptop")
    (d / PUBLIC_FILE).write_text(_k(3) + "\n")
    allow = AllowList(d, clock=clock)
    assert (allow.quota(_pub(1)), allow.label(_pub(1))) == (3, "a")
    assert (allow.quota(_pub(2)), allow.label(_pub(2))) == (4, "bob-laptop")
    assert (allow.quota(_pub(3)), allow.label(_pub(3))) == (None, None)
    (d / "a.pub").write_text(f"{_k(1)} quota=0\n")
    clock.tick()
    assert not allow.allows(_pub(1))  # a broken quota revokes the key
    assert allow.allows(_pub(2))


# --------------------------------------------------------------------------- quotas


def test_quota_before_or_after_the_label(tmp_path: Path, clock: FakeClock) -> None:
    f = _file(
        tmp_path,
        f"{_k(1)} quota=8 alice phone",
        f"{_k(2)} bob laptop   quota=2",
        f"{_k(3)}\tquota=5",
        f"{_k(4)} no quota here",
        f"{_k(5)} QUOTA=7",
    )
    allow = AllowList(f, clock=clock)
    assert (allow.quota(_pub(1)), allow.label(_pub(1))) == (8, "alice phone")
    assert (allow.quota(_pub(2)), allow.label(_pub(2))) == (2, "bob laptop")
    assert (allow.quota(_pub(3)), allow.label(_pub(3))) == (5, None)
    assert (allow.quota(_pub(4)), allow.label(_pub(4))) == (None, "no quota here")
    assert allow.quota(_pub(5)) == 7
    assert allow.quota(_pub(6)) is None  # not listed
    assert allow.entries()[_pub(1)] == "alice phone"


@pytest.mark.parametrize(
    "tail",
    [
        "quota=0",
        "quota=abc",
        "quota=-1",
        "quota=",
        "quota=1.5",
        "quota=+3",
        "quota=1234567890",
        "quota=2 label quota=3",
        "alice quota=2 phone",
    ],
)
def test_malformed_quota_makes_the_line_malformed(tmp_path: Path, tail: str) -> None:
    f = _file(tmp_path, "# devices", f"{_k(1)} {tail}")
    with pytest.raises(UsageError) as info:
        AllowList(f)
    assert f"{f}:2:" in info.value.message
    assert info.value.hint and "quota=N" in info.value.hint


def test_broken_edit_cannot_raise_a_quota(tmp_path: Path, clock: FakeClock) -> None:
    f = _file(tmp_path, f"{_k(1)} quota=2", _k(2), f"{_k(3)} quota=5")
    allow = AllowList(f, clock=clock)
    f.write_text(_lines(f"{_k(1)} quota=10", f"{_k(2)} quota=4", _k(3), "junk"))
    clock.tick()
    assert allow.quota(_pub(1)) == 2  # raising it needs a clean file
    assert allow.quota(_pub(2)) == 4  # adding (lowering) one applies
    assert allow.quota(_pub(3)) == 5  # dropping it does not
    f.write_text(_lines(f"{_k(1)} quota=10", _k(2), _k(3)))
    clock.tick()
    assert [allow.quota(_pub(n)) for n in (1, 2, 3)] == [10, None, None]


# --------------------------------------------------------------------------- generation


def test_generation_counts_only_enforced_changes(tmp_path: Path, clock: FakeClock) -> None:
    f = _file(tmp_path, f"{_k(1)} alice", _k(2))
    allow = AllowList(f, clock=clock)
    steps: list[tuple[str, int]] = [
        (_lines(f"{_k(1)} alice", _k(2)), 0),  # same bytes rewritten
        (_lines("# a comment", f"{_k(1)} alice", _k(2)), 0),  # comment only
        (_lines("# a comment", f"{_k(1)} alice-phone", _k(2)), 0),  # label only
        (_lines(f"{_k(2)}", f"{_k(1)} alice-phone"), 0),  # order only
        (_lines(f"{_k(1)} alice-phone quota=3", _k(2)), 1),  # quota added
        (_lines(f"{_k(1)} alice-phone quota=3", _k(2), _k(3)), 1),  # key added
        (_lines(f"{_k(1)} alice-phone quota=3", _k(3)), 1),  # key removed
    ]
    for text, bump in steps:
        before = allow.generation
        f.write_text(text)
        clock.tick()
        assert allow.check() is bool(bump), text
        assert allow.generation == before + bump, text
    assert allow.label(_pub(1)) == "alice-phone"
    assert allow.generation == 3


def test_check_is_rate_limited(tmp_path: Path, clock: FakeClock) -> None:
    f = _file(tmp_path, _k(1))
    allow = AllowList(f, check_interval=2.0, clock=clock)
    f.write_text(_lines(_k(2)))
    clock.tick(1.9)
    assert allow.check() is False and allow.generation == 0
    clock.tick(0.1)
    assert allow.check() is True and allow.generation == 1


# --------------------------------------------------------------------------- construction


def test_construction_raises_on_missing_source(tmp_path: Path) -> None:
    for missing in (tmp_path / "nope", tmp_path / "no-folder" / "keys"):
        with pytest.raises(UsageError, match="does not exist") as info:
            AllowList(missing)
        assert info.value.hint


def test_construction_raises_on_malformed_file(tmp_path: Path) -> None:
    f = _file(tmp_path, "# ok", _k(1), "x25519:broken label", "also broken")
    with pytest.raises(UsageError) as info:
        AllowList(f)
    assert f"{f}:3:" in info.value.message and f"{f}:4:" in info.value.message


def test_construction_raises_on_non_utf8_file(tmp_path: Path) -> None:
    f = tmp_path / "authorized_keys"
    f.write_bytes(_k(1).encode() + b" caf\xe9\n")
    with pytest.raises(UsageError, match=r":1: not UTF-8"):
        AllowList(f)


def test_construction_raises_on_malformed_folder(tmp_path: Path) -> None:
    d = _folder(tmp_path, a=_k(1), b=_lines(_k(2), _k(3)))
    with pytest.raises(UsageError, match="exactly one public key, found 2"):
        AllowList(d)
