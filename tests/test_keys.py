"""Tests for edgeoffload.keys: key files and modes, text forms, fingerprints, the allow-list."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from edgeoffload.edge.allowlist import AllowList
from edgeoffload.errors import UsageError
from edgeoffload.keys import (
    PRIVATE_FILE,
    PUBLIC_FILE,
    KeyPair,
    decode_public,
    encode_public,
    fingerprint,
    generate_identity,
    load_identity,
    load_public,
)

# RFC 7748 section 6.1: Alice's X25519 key pair.
RFC_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
RFC_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
RFC_PUBLIC_TEXT = "x25519:hSDwCYkwp1R0i33ctD73Wg2_Og0mOBr066SpjqqbTmo"

keys32 = st.binary(min_size=32, max_size=32)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _pub(n: int) -> bytes:
    """A distinct, deterministic public key."""
    return KeyPair.from_private(hashlib.sha256(b"test-key-%d" % n).digest()).public


class FakeClock:
    """A monotonic clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _touch_later(path: Path, seconds: int = 10) -> None:
    """Make sure the mtime_ns changes even on coarse-timestamp file systems."""
    st_ = path.stat()
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns + seconds * 1_000_000_000))


# --------------------------------------------------------------------------- identity files


def test_generate_writes_files_with_safe_modes(tmp_path: Path) -> None:
    d = tmp_path / "nested" / "keys"
    ident = generate_identity(d)
    assert _mode(d) == 0o700
    assert _mode(d / PRIVATE_FILE) == 0o600
    assert _mode(d / PUBLIC_FILE) == 0o644
    assert (d / PUBLIC_FILE).read_text() == encode_public(ident.public) + "\n"
    private_text = (d / PRIVATE_FILE).read_text()
    assert re.fullmatch(r"x25519-private:[A-Za-z0-9_-]{43}\n", private_text)
    # No temp files are left behind.
    assert sorted(p.name for p in d.iterdir()) == [PRIVATE_FILE, PUBLIC_FILE]


def test_generate_ignores_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        generate_identity(tmp_path / "k")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "k") == 0o700
    assert _mode(tmp_path / "k" / PRIVATE_FILE) == 0o600


def test_load_round_trip_and_x25519_derivation(tmp_path: Path) -> None:
    ident = generate_identity(tmp_path / "k")
    loaded = load_identity(tmp_path / "k")
    assert loaded == ident
    assert len(ident.private) == len(ident.public) == 32
    derived = X25519PrivateKey.from_private_bytes(ident.private).public_key().public_bytes_raw()
    assert ident.public == derived
    assert decode_public((tmp_path / "k" / PUBLIC_FILE).read_text()) == ident.public
    assert load_identity(str(tmp_path / "k")) == ident


def test_two_identities_differ(tmp_path: Path) -> None:
    a = generate_identity(tmp_path / "a")
    b = generate_identity(tmp_path / "b")
    assert a.private != b.private and a.public != b.public


def test_overwrite_refused_then_allowed(tmp_path: Path) -> None:
    d = tmp_path / "k"
    first = generate_identity(d)
    with pytest.raises(UsageError) as info:
        generate_identity(d)
    assert "--force" in (info.value.hint or "")
    assert load_identity(d) == first  # untouched
    second = generate_identity(d, overwrite=True)
    assert second != first
    assert load_identity(d) == second
    assert _mode(d / PRIVATE_FILE) == 0o600
    assert sorted(p.name for p in d.iterdir()) == [PRIVATE_FILE, PUBLIC_FILE]


def test_generate_into_an_existing_directory(tmp_path: Path) -> None:
    ident = generate_identity(tmp_path)
    assert load_identity(tmp_path) == ident


def test_generate_onto_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError):
        generate_identity(tmp_path / "f")


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_refuses_a_readable_private_key(tmp_path: Path, mode: int) -> None:
    d = tmp_path / "k"
    generate_identity(d)
    (d / PRIVATE_FILE).chmod(mode)
    with pytest.raises(UsageError) as info:
        load_identity(d)
    assert "too open" in info.value.message
    assert info.value.hint == f"chmod 600 {d / PRIVATE_FILE}"
    (d / PRIVATE_FILE).chmod(0o600)
    load_identity(d)
    (d / PRIVATE_FILE).chmod(0o400)  # stricter is fine
    load_identity(d)


def test_load_refuses_a_mismatched_public_key(tmp_path: Path) -> None:
    a = generate_identity(tmp_path / "a")
    b = generate_identity(tmp_path / "b")
    (tmp_path / "a" / PUBLIC_FILE).write_text(encode_public(b.public) + "\n")
    with pytest.raises(UsageError) as info:
        load_identity(tmp_path / "a")
    assert "does not match" in info.value.message
    # Keys appear only as fingerprints.
    assert a.fingerprint in info.value.message and b.fingerprint in info.value.message
    assert encode_public(b.public) not in info.value.message


def test_load_without_public_key_file(tmp_path: Path) -> None:
    ident = generate_identity(tmp_path / "k")
    (tmp_path / "k" / PUBLIC_FILE).unlink()
    assert load_identity(tmp_path / "k") == ident


def test_load_malformed_public_key_file(tmp_path: Path) -> None:
    generate_identity(tmp_path / "k")
    (tmp_path / "k" / PUBLIC_FILE).write_text("garbage\n")
    with pytest.raises(UsageError, match="not a valid public key"):
        load_identity(tmp_path / "k")


def test_load_missing_directory_or_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        load_identity(tmp_path / "nope")
    assert "edgeoffload keys generate" in (info.value.hint or "")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError) as info:
        load_identity(tmp_path / "empty")
    assert "edgeoffload keys generate" in (info.value.hint or "")


def test_load_malformed_private_key_does_not_echo_it(tmp_path: Path) -> None:
    d = tmp_path / "k"
    generate_identity(d)
    secret = "x25519-private:" + "A" * 40  # too short
    (d / PRIVATE_FILE).write_text(secret + "\n")
    with pytest.raises(UsageError) as info:
        load_identity(d)
    assert "A" * 40 not in str(info.value) + (info.value.hint or "")


def test_identity_repr_hides_the_private_key() -> None:
    ident = KeyPair.from_private(RFC_PRIVATE)
    assert ident.public == RFC_PUBLIC
    text = repr(ident)
    assert ident.fingerprint in text
    assert RFC_PRIVATE.hex() not in text and repr(RFC_PRIVATE) not in text


def test_identity_rejects_inconsistent_or_short_keys() -> None:
    with pytest.raises(UsageError):
        KeyPair(private=RFC_PRIVATE, public=_pub(1))
    with pytest.raises(UsageError):
        KeyPair.from_private(b"short")


# --------------------------------------------------------------------------- text forms


@given(keys32)
def test_encode_decode_round_trip(public: bytes) -> None:
    text = encode_public(public)
    assert re.fullmatch(r"x25519:[A-Za-z0-9_-]{43}", text)
    assert decode_public(text) == public
    assert decode_public(f"  {text}\n") == public
    # Lenient forms.
    assert decode_public(public.hex()) == public
    assert decode_public(public.hex().upper()) == public
    assert decode_public(base64.b64encode(public).decode()) == public
    assert decode_public(base64.b64encode(public).decode().rstrip("=")) == public


def test_rfc_key_text_form() -> None:
    assert encode_public(RFC_PUBLIC) == RFC_PUBLIC_TEXT
    assert decode_public(RFC_PUBLIC_TEXT) == RFC_PUBLIC


@pytest.mark.parametrize(
    "text",
    [
        "",
        "x25519:",
        "x25519:" + "A" * 42,
        "x25519:" + "A" * 44,
        "x25519:hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo",  # '/' is not base64url
        "x25519:hSDwCYkwp1R0i33ctD73Wg2_Og0mOBr066SpjqqbTmp",  # non-canonical last char
        "X25519:hSDwCYkwp1R0i33ctD73Wg2_Og0mOBr066SpjqqbTmo",
        "ed25519:hSDwCYkwp1R0i33ctD73Wg2_Og0mOBr066SpjqqbTmo",
        "00" * 31,
        "00" * 33,
        "zz" * 32,
        base64.b64encode(bytes(31)).decode(),
        base64.b64encode(bytes(33)).decode(),
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIO",
    ],
)
def test_decode_rejects_bad_text(text: str) -> None:
    with pytest.raises(UsageError) as info:
        decode_public(text)
    assert "x25519:" in (info.value.hint or "")


def test_decode_refuses_a_private_key_without_echoing_it() -> None:
    secret = "x25519-private:" + base64.urlsafe_b64encode(RFC_PRIVATE).decode().rstrip("=")
    with pytest.raises(UsageError, match="private key") as info:
        decode_public(secret)
    assert secret not in str(info.value) + (info.value.hint or "")


def test_encode_rejects_wrong_length() -> None:
    with pytest.raises(UsageError):
        encode_public(bytes(31))
    with pytest.raises(UsageError):
        fingerprint(bytes(33))


def test_fingerprint_format_and_stability() -> None:
    assert fingerprint(RFC_PUBLIC) == "s3nf-rdk5-5lr7-cpag"
    assert fingerprint(bytes(32)) == "kgkk-liiu-cesh-tg2n"
    assert KeyPair.from_private(RFC_PRIVATE).fingerprint == "s3nf-rdk5-5lr7-cpag"


@given(keys32)
def test_fingerprint_shape(public: bytes) -> None:
    fp = fingerprint(public)
    assert re.fullmatch(r"[a-z2-7]{4}(-[a-z2-7]{4}){3}", fp)
    digest = hashlib.sha256(b"edgeoffload-key-v1" + public).digest()[:10]
    assert base64.b32decode(fp.replace("-", "").upper()) == digest


# --------------------------------------------------------------------------- load_public


def test_load_public_from_text_file_and_directory(tmp_path: Path) -> None:
    ident = generate_identity(tmp_path / "dev")
    assert load_public(encode_public(ident.public)) == ident.public
    assert load_public(ident.public.hex()) == ident.public
    assert load_public(str(tmp_path / "dev" / PUBLIC_FILE)) == ident.public
    assert load_public(tmp_path / "dev" / PUBLIC_FILE) == ident.public
    assert load_public(str(tmp_path / "dev")) == ident.public
    assert load_public(tmp_path / "dev") == ident.public
    labelled = tmp_path / "phone.pub"
    labelled.write_text(f"# Alice's phone\n{encode_public(ident.public)} alice-phone\n")
    assert load_public(labelled) == ident.public


def test_load_public_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        load_public("no-such-file-or-key")
    with pytest.raises(UsageError):
        load_public(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError) as info:
        load_public(tmp_path / "empty")
    assert "edgeoffload keys generate" in (info.value.hint or "")
    two = tmp_path / "two.pub"
    two.write_text(f"{encode_public(_pub(1))}\n{encode_public(_pub(2))}\n")
    with pytest.raises(UsageError, match="exactly one"):
        load_public(two)


def test_load_public_refuses_a_private_key_file(tmp_path: Path) -> None:
    generate_identity(tmp_path / "k")
    with pytest.raises(UsageError, match="private key") as info:
        load_public(tmp_path / "k" / PRIVATE_FILE)
    private_text = (tmp_path / "k" / PRIVATE_FILE).read_text().strip()
    assert private_text not in str(info.value)


# --------------------------------------------------------------------------- allow-list


def _authorized(*lines: str) -> str:
    return "\n".join(lines) + "\n"


def test_allowlist_from_file_with_comments_and_labels(tmp_path: Path) -> None:
    f = tmp_path / "authorized_keys"
    f.write_text(
        _authorized(
            "# devices allowed on this edge server",
            "",
            f"{encode_public(_pub(1))} alice phone",
            f"   {encode_public(_pub(2))}",
            "   # indented comment",
            f"{_pub(3).hex()}\tpi-kitchen",
            f"{encode_public(_pub(1))} duplicate",
        )
    )
    allow = AllowList(f)
    assert len(allow) == 3
    for n in (1, 2, 3):
        assert allow.allows(_pub(n))
    assert not allow.allows(_pub(4))
    assert allow.label(_pub(1)) == "alice phone"  # the first entry wins
    assert allow.label(_pub(2)) is None
    assert allow.label(_pub(3)) == "pi-kitchen"
    assert allow.label(_pub(4)) is None
    assert _pub(1) in allow
    assert encode_public(_pub(1)) not in repr(allow)


def test_allowlist_empty_file(tmp_path: Path) -> None:
    f = tmp_path / "authorized_keys"
    f.write_text("# nobody yet\n")
    allow = AllowList(f)
    assert len(allow) == 0
    assert not allow.allows(_pub(1))


def test_allowlist_from_folder(tmp_path: Path) -> None:
    d = tmp_path / "devices"
    d.mkdir()
    (d / "alice.pub").write_text(encode_public(_pub(1)) + "\n")
    (d / "bob.pub").write_text(f"# bob's laptop\n{encode_public(_pub(2))} bob-laptop\n")
    (d / PUBLIC_FILE).write_text(encode_public(_pub(3)) + "\n")
    (d / "README.txt").write_text("not a key file, ignored\n")
    (d / ".carol.pub.swp").write_text("editor junk, ignored\n")
    (d / "sub.pub").mkdir()  # not a file, ignored
    allow = AllowList(d)
    assert len(allow) == 3
    assert allow.label(_pub(1)) == "alice"
    assert allow.label(_pub(2)) == "bob-laptop"
    assert allow.allows(_pub(3))
    assert not allow.allows(_pub(4))


def test_allowlist_folder_file_with_two_keys_is_an_error(tmp_path: Path) -> None:
    d = tmp_path / "devices"
    d.mkdir()
    (d / "x.pub").write_text(f"{encode_public(_pub(1))}\n{encode_public(_pub(2))}\n")
    with pytest.raises(UsageError, match="exactly one"):
        AllowList(d)


def test_allowlist_missing_path(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        AllowList(tmp_path / "nope")
    assert info.value.hint


def test_allowlist_first_load_failure_raises_with_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "authorized_keys"
    f.write_text(_authorized("# ok", encode_public(_pub(1)), "x25519:broken label"))
    with pytest.raises(UsageError) as info:
        AllowList(f)
    assert f"{f}:3:" in info.value.message


def test_allowlist_reloads_after_interval(tmp_path: Path) -> None:
    f = tmp_path / "authorized_keys"
    f.write_text(_authorized(encode_public(_pub(1))))
    clock = FakeClock()
    allow = AllowList(f, check_interval=5.0, clock=clock)
    assert not allow.allows(_pub(2))

    with f.open("a") as fh:
        fh.write(f"{encode_public(_pub(2))} new-device\n")
    _touch_later(f)
    clock.now += 4.9
    assert not allow.allows(_pub(2))  # not checked yet: interval not over
    clock.now += 0.2
    assert allow.allows(_pub(2))
    assert allow.label(_pub(2)) == "new-device"
    assert len(allow) == 2

    # Removal is picked up too (a rewrite through a new file, as editors do).
    tmp = tmp_path / "authorized_keys.new"
    tmp.write_text(_authorized(encode_public(_pub(2))))
    os.replace(tmp, f)
    _touch_later(f, 20)
    clock.now += 5.0
    assert not allow.allows(_pub(1))
    assert allow.allows(_pub(2))


def test_allowlist_folder_reload_picks_up_new_and_removed_files(tmp_path: Path) -> None:
    d = tmp_path / "devices"
    d.mkdir()
    (d / "a.pub").write_text(encode_public(_pub(1)) + "\n")
    clock = FakeClock()
    allow = AllowList(d, check_interval=1.0, clock=clock)
    (d / "b.pub").write_text(encode_public(_pub(2)) + "\n")
    clock.now += 1.0
    assert allow.allows(_pub(2))
    assert allow.label(_pub(2)) == "b"
    (d / "a.pub").unlink()
    clock.now += 1.0
    assert not allow.allows(_pub(1))
    assert len(allow) == 1


def test_allowlist_malformed_edit_fails_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = tmp_path / "authorized_keys"
    f.write_text(_authorized(encode_public(_pub(1))))
    clock = FakeClock()
    allow = AllowList(f, check_interval=1.0, clock=clock)

    f.write_text(_authorized(encode_public(_pub(1)), encode_public(_pub(2)), "not-a-key"))
    _touch_later(f)
    clock.now += 1.0
    with caplog.at_level(logging.WARNING, logger="edgeoffload.edge.allowlist"):
        assert allow.allows(_pub(1))  # still listed on a valid line: stays
        assert not allow.allows(_pub(2))  # new in a broken edit: never admitted
    warnings = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(warnings) == 1
    assert f"{f}:3:" in warnings[0].getMessage()
    for record in caplog.records:
        assert encode_public(_pub(1)) not in record.getMessage()

    # The same broken state is not re-parsed (no warning storm) ...
    caplog.clear()
    clock.now += 1.0
    with caplog.at_level(logging.WARNING, logger="edgeoffload.edge.allowlist"):
        assert allow.allows(_pub(1))
    assert not caplog.records
    # ... and an explicit reload raises, keeping the old list.
    with pytest.raises(UsageError) as info:
        allow.reload()
    assert f"{f}:3:" in info.value.message
    assert allow.allows(_pub(1)) and len(allow) == 1
    with caplog.at_level(logging.WARNING, logger="edgeoffload.edge.allowlist"):
        assert allow.try_reload() is False
    assert any(f"{f}:3:" in r.getMessage() for r in caplog.records)

    # Fixing the file is picked up.
    f.write_text(_authorized(encode_public(_pub(1)), encode_public(_pub(2))))
    _touch_later(f, 20)
    clock.now += 1.0
    assert allow.allows(_pub(2))


def test_allowlist_deleted_file_admits_nobody(tmp_path: Path) -> None:
    f = tmp_path / "authorized_keys"
    f.write_text(_authorized(encode_public(_pub(1))))
    clock = FakeClock()
    allow = AllowList(f, check_interval=0, clock=clock)
    f.unlink()
    assert not allow.allows(_pub(1))
    with pytest.raises(UsageError):
        allow.reload()
    assert not allow.allows(_pub(1))
    f.write_text(_authorized(encode_public(_pub(1))))
    assert allow.allows(_pub(1))


def test_allowlist_explicit_reload(tmp_path: Path) -> None:
    f = tmp_path / "authorized_keys"
    f.write_text(_authorized(encode_public(_pub(1))))
    clock = FakeClock()
    allow = AllowList(f, check_interval=3600.0, clock=clock)
    f.write_text(_authorized(encode_public(_pub(1)), encode_public(_pub(2))))
    assert not allow.allows(_pub(2))
    allow.reload()
    assert allow.allows(_pub(2))
    f.write_text(_authorized(encode_public(_pub(3))))
    assert allow.try_reload() is True
    assert allow.allows(_pub(3)) and not allow.allows(_pub(1))


def test_allowlist_rejects_negative_interval(tmp_path: Path) -> None:
    f = tmp_path / "authorized_keys"
    f.write_text("")
    with pytest.raises(UsageError):
        AllowList(f, check_interval=-1.0)


def test_allowlist_accepts_generated_public_key_files(tmp_path: Path) -> None:
    d = tmp_path / "devices"
    d.mkdir()
    ident = generate_identity(tmp_path / "dev")
    (d / "dev.pub").write_bytes((tmp_path / "dev" / PUBLIC_FILE).read_bytes())
    allow = AllowList(d)
    assert allow.allows(load_identity(tmp_path / "dev").public)
    assert allow.label(ident.public) == "dev"
