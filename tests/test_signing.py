"""Tests for edgeoffload.signing: publisher keys, signing and verifying real zoo bundles."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgeoffload.bundle import MANIFEST, TAIL, load_bundle, write_bundle, write_manifest
from edgeoffload.cli import main
from edgeoffload.errors import (
    BadSignature,
    ManifestError,
    SignatureError,
    UnknownPublisher,
    Unsigned,
    UsageError,
)
from edgeoffload.signing import (
    SIGNATURE,
    PublisherKey,
    decode_publisher_public,
    encode_publisher_public,
    generate_publisher,
    load_publisher,
    load_trusted,
    read_signature,
    sign_bundle,
    verify_bundle,
)
from edgeoffload.split import splitter, zoo
from edgeoffload.split.analysis import Analysis

# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A resnet bundle cut in the middle (a head and a tail), split once per module."""
    analysis = Analysis.of(zoo.build("resnet", seed=0))
    out = tmp_path_factory.mktemp("signing") / "mid"
    splitter.split_model(analysis, analysis.cuts[len(analysis.cuts) // 2], out)
    return out


@pytest.fixture
def bundle_dir(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of the bundle that a test may sign or damage."""
    return Path(shutil.copytree(pristine, tmp_path / "bundle"))


@pytest.fixture(scope="module")
def publisher(tmp_path_factory) -> PublisherKey:
    return generate_publisher(tmp_path_factory.mktemp("keys") / "pub")


@pytest.fixture
def signed(bundle_dir: Path, publisher: PublisherKey) -> Path:
    sign_bundle(bundle_dir, publisher, now=0.0)
    return bundle_dir


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# --- keys ----------------------------------------------------------------------------------


def test_generate_and_load_publisher(tmp_path: Path) -> None:
    key = generate_publisher(tmp_path / "pub")
    assert len(key.private) == 32 and len(key.public) == 32
    private = (tmp_path / "pub" / "publisher.key").read_text()
    public = (tmp_path / "pub" / "publisher.pub").read_text()
    assert private.startswith("ed25519-private:") and private.endswith("\n")
    assert public == encode_publisher_public(key.public) + "\n"
    assert public.startswith("ed25519:") and len(public.strip()) == len("ed25519:") + 43
    if os.name != "nt":
        assert stat.S_IMODE((tmp_path / "pub" / "publisher.key").stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "pub").stat().st_mode) == 0o700
    loaded = load_publisher(tmp_path / "pub")
    assert loaded == key
    assert loaded.fingerprint == key.fingerprint and len(key.fingerprint) == 19
    assert key.private.hex() not in repr(key) and key.fingerprint in repr(key)
    assert decode_publisher_public(public) == key.public


def test_generate_refuses_to_replace(tmp_path: Path) -> None:
    first = generate_publisher(tmp_path / "pub")
    with pytest.raises(UsageError, match="already exists"):
        generate_publisher(tmp_path / "pub")
    second = generate_publisher(tmp_path / "pub", overwrite=True)
    assert second != first and load_publisher(tmp_path / "pub") == second


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions and symlinks")
def test_private_key_file_checks(tmp_path: Path) -> None:
    generate_publisher(tmp_path / "real")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "publisher.key").symlink_to(tmp_path / "real" / "publisher.key")
    with pytest.raises(UsageError, match="symbolic link"):
        load_publisher(linked)
    (tmp_path / "real" / "publisher.key").chmod(0o644)
    with pytest.raises(UsageError, match="too open"):
        load_publisher(tmp_path / "real")
    with pytest.raises(UsageError, match=r"has no publisher\.key"):
        load_publisher(tmp_path)
    with pytest.raises(UsageError, match="does not exist"):
        load_publisher(tmp_path / "missing")


def test_malformed_and_mismatched_key_files(tmp_path: Path) -> None:
    generate_publisher(tmp_path / "a")
    generate_publisher(tmp_path / "b")
    shutil.copy(tmp_path / "b" / "publisher.pub", tmp_path / "a" / "publisher.pub")
    with pytest.raises(UsageError, match="does not match"):
        load_publisher(tmp_path / "a")
    key_file = tmp_path / "b" / "publisher.key"
    key_file.write_text("x25519-private:" + "A" * 43 + "\n")
    with pytest.raises(UsageError, match="not a valid publisher key file") as info:
        load_publisher(tmp_path / "b")
    assert "AAAA" not in str(info.value)  # never echoes the contents


def test_public_text_forms() -> None:
    key = PublisherKey.generate()
    text = encode_publisher_public(key.public)
    assert decode_publisher_public(f"  {text}\n") == key.public
    for bad in ("x25519:" + text[8:], text[:-1], text + "A", "ed25519:" + "!" * 43, ""):
        with pytest.raises(UsageError):
            decode_publisher_public(bad)
    with pytest.raises(UsageError, match="private key"):
        decode_publisher_public("ed25519-private:" + text[8:])
    # The last character carries 4 unused bits: only the canonical form is accepted.
    last = text[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    sibling = alphabet[alphabet.index(last) ^ 1]
    with pytest.raises(UsageError):
        decode_publisher_public(text[:-1] + sibling)


def test_pair_is_checked() -> None:
    a, b = PublisherKey.generate(), PublisherKey.generate()
    with pytest.raises(UsageError, match="does not belong"):
        PublisherKey(private=a.private, public=b.public)
    with pytest.raises(UsageError):
        PublisherKey.from_private(b"short")


# --- sign and verify -----------------------------------------------------------------------


def test_sign_and_verify_round_trip(signed: Path, publisher: PublisherKey) -> None:
    document = json.loads((signed / SIGNATURE).read_text())
    manifest_bytes = (signed / MANIFEST).read_bytes()
    assert set(document) == {"schema", "publisher", "signed", "signature", "signed_at"}
    assert document["schema"] == 1
    assert document["publisher"] == encode_publisher_public(publisher.public)
    assert document["signed"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert document["signed_at"] == "1970-01-01T00:00:00Z"
    # The contract others verify against: plain Ed25519 over the exact manifest.json bytes.
    raw = base64.urlsafe_b64decode(document["signature"] + "==")
    Ed25519PublicKey.from_public_bytes(publisher.public).verify(raw, manifest_bytes)

    assert verify_bundle(signed, [publisher.public]) == publisher.public
    other = PublisherKey.generate()
    assert verify_bundle(signed, (other.public, publisher.public)) == publisher.public
    bundle = load_bundle(signed, trusted=[publisher.public])
    assert bundle.publisher == publisher.public
    assert load_bundle(signed).publisher is None  # no trust list: the signature is not read
    assert read_signature(signed) is not None and read_signature(signed).signed_at.endswith("Z")


def test_resign_replaces_the_signature(signed: Path, publisher: PublisherKey) -> None:
    other = PublisherKey.generate()
    sign_bundle(signed, other)
    assert verify_bundle(signed, [other.public]) == other.public
    with pytest.raises(UnknownPublisher):
        verify_bundle(signed, [publisher.public])
    assert [p.name for p in signed.iterdir() if p.name.endswith(".tmp")] == []


def test_unsigned_is_refused(bundle_dir: Path, publisher: PublisherKey) -> None:
    with pytest.raises(Unsigned, match="not signed") as info:
        verify_bundle(bundle_dir, [publisher.public])
    assert isinstance(info.value, SignatureError) and isinstance(info.value, ManifestError)
    assert info.value.exit_code == 5
    assert load_bundle(bundle_dir).publisher is None  # existing callers are unaffected


def test_empty_trust_list_refuses_everything(signed: Path, bundle_dir: Path) -> None:
    with pytest.raises(UnknownPublisher, match=r"not a trusted") as info:
        load_bundle(signed, trusted=[])
    assert "empty" in (info.value.hint or "")
    unsigned = Path(shutil.copytree(signed, bundle_dir.parent / "unsigned"))
    (unsigned / SIGNATURE).unlink()
    with pytest.raises(Unsigned):
        load_bundle(unsigned, trusted=())
    with pytest.raises(UnknownPublisher):
        load_bundle(signed, trusted=[], verify=False)  # the signature is checked regardless


def test_other_publisher_is_named(signed: Path, publisher: PublisherKey) -> None:
    other = PublisherKey.generate()
    with pytest.raises(UnknownPublisher) as info:
        verify_bundle(signed, [other.public])
    assert publisher.fingerprint in info.value.message
    assert other.fingerprint not in info.value.message


def test_flipped_manifest_byte_is_a_bad_signature(signed: Path, publisher: PublisherKey) -> None:
    _flip(signed / MANIFEST, len((signed / MANIFEST).read_bytes()) // 2)
    with pytest.raises(BadSignature, match="modified after"):
        verify_bundle(signed, [publisher.public])


def test_edited_manifest_with_matching_hash_is_a_bad_signature(
    signed: Path, publisher: PublisherKey
) -> None:
    """An attacker edits the manifest and fixes up 'signed': the signature still fails."""
    data = json.loads((signed / MANIFEST).read_text())
    data["codec"] = "fp16"
    (signed / MANIFEST).write_text(json.dumps(data, indent=1) + "\n")
    document = json.loads((signed / SIGNATURE).read_text())
    document["signed"] = hashlib.sha256((signed / MANIFEST).read_bytes()).hexdigest()
    (signed / SIGNATURE).write_text(json.dumps(document))
    with pytest.raises(BadSignature, match="does not verify"):
        verify_bundle(signed, [publisher.public])


def test_flipped_part_byte_fails_its_hash(signed: Path, publisher: PublisherKey) -> None:
    _flip(signed / TAIL, len((signed / TAIL).read_bytes()) // 2)
    with pytest.raises(ManifestError, match="modified after splitting") as info:
        verify_bundle(signed, [publisher.public])
    assert not isinstance(info.value, SignatureError)  # the signature itself was fine


def test_sign_refuses_a_damaged_bundle(bundle_dir: Path, publisher: PublisherKey) -> None:
    _flip(bundle_dir / TAIL, 100)
    with pytest.raises(ManifestError, match="modified"):
        sign_bundle(bundle_dir, publisher)
    assert not (bundle_dir / SIGNATURE).exists()
    with pytest.raises(ManifestError, match=r"no manifest\.json"):
        sign_bundle(bundle_dir.parent, publisher)
    with pytest.raises(UsageError, match="PublisherKey"):
        sign_bundle(bundle_dir, publisher.private)  # type: ignore[arg-type]


def _good_document(signed: Path) -> dict:
    return json.loads((signed / SIGNATURE).read_text())


_MALFORMED = {
    "not json": b"{not json",
    "not utf-8": b"\xff\xfe{}",
    "a list": b"[]",
    "missing field": lambda d: {k: v for k, v in d.items() if k != "signed_at"},
    "unknown field": lambda d: {**d, "extra": 1},
    "schema 2": lambda d: {**d, "schema": 2},
    "schema true": lambda d: {**d, "schema": True},
    "publisher x25519": lambda d: {**d, "publisher": "x25519:" + d["publisher"][8:]},
    "publisher number": lambda d: {**d, "publisher": 7},
    "signature short": lambda d: {**d, "signature": d["signature"][:-2]},
    "signature padded": lambda d: {**d, "signature": d["signature"] + "=="},
    "signature std b64": lambda d: {**d, "signature": "+" + d["signature"][1:]},
    "signed upper hex": lambda d: {**d, "signed": d["signed"].upper()},
    "signed short": lambda d: {**d, "signed": d["signed"][:-1]},
    "signed_at garbage": lambda d: {**d, "signed_at": "yesterday"},
    "zero signature": lambda d: {**d, "signature": _b64(bytes(64))},
    "huge": b" " * 20000 + b"{}",
}


@pytest.mark.parametrize("case", sorted(_MALFORMED))
def test_malformed_signature_file(signed: Path, publisher: PublisherKey, case: str) -> None:
    variant = _MALFORMED[case]
    if isinstance(variant, bytes):
        (signed / SIGNATURE).write_bytes(variant)
    else:
        (signed / SIGNATURE).write_text(json.dumps(variant(_good_document(signed))))
    with pytest.raises(BadSignature):
        verify_bundle(signed, [publisher.public])


def test_signature_file_that_is_a_directory(signed: Path, publisher: PublisherKey) -> None:
    (signed / SIGNATURE).unlink()
    (signed / SIGNATURE).mkdir()
    with pytest.raises(BadSignature):
        verify_bundle(signed, [publisher.public])


def test_signature_of_another_manifest(
    signed: Path, pristine: Path, publisher: PublisherKey, tmp_path: Path
) -> None:
    """A valid signature.json copied from a different bundle is refused."""
    analysis = Analysis.of(zoo.build("resnet", seed=0))
    other = splitter.split_model(analysis, analysis.cuts[1], tmp_path / "other").path
    sign_bundle(other, publisher)
    shutil.copy(other / SIGNATURE, signed / SIGNATURE)
    with pytest.raises(BadSignature, match="modified after"):
        verify_bundle(signed, [publisher.public])


def test_bad_trusted_argument(signed: Path, publisher: PublisherKey) -> None:
    with pytest.raises(UsageError, match="sequence"):
        verify_bundle(signed, publisher.public)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="32 raw bytes"):
        verify_bundle(signed, [b"short"])


# --- manifest rewrites drop the signature --------------------------------------------------


def test_rewriting_the_manifest_removes_the_signature(
    signed: Path, publisher: PublisherKey
) -> None:
    bundle = load_bundle(signed)
    assert write_manifest(signed, bundle.manifest) is True
    assert not (signed / SIGNATURE).exists()
    assert write_manifest(signed, bundle.manifest) is False
    with pytest.raises(Unsigned):
        verify_bundle(signed, [publisher.public])


def test_resplit_into_the_folder_removes_the_signature(
    signed: Path, publisher: PublisherKey
) -> None:
    bundle = load_bundle(signed)
    write_bundle(
        signed,
        bundle.manifest,
        head=(signed / "head.onnx").read_bytes(),
        tail=(signed / TAIL).read_bytes(),
    )
    assert not (signed / SIGNATURE).exists()


def test_export_ort_drops_the_stale_signature(signed: Path, publisher: PublisherKey) -> None:
    pytest.importorskip("onnxruntime.tools.ort_format_model")
    from edgeoffload.split.ort_export import export_ort

    export_ort(signed, tail=False, samples=1)
    assert not (signed / SIGNATURE).exists()
    sign_bundle(signed, publisher)  # sign last: the signature now covers the ort section too
    assert verify_bundle(signed, [publisher.public]) == publisher.public
    _flip(signed / "head.ort", 64)
    with pytest.raises(ManifestError, match="modified after export-ort"):
        verify_bundle(signed, [publisher.public])


# --- trust lists ---------------------------------------------------------------------------


def test_trust_file(tmp_path: Path) -> None:
    a, b = PublisherKey.generate(), PublisherKey.generate()
    path = tmp_path / "trusted"
    path.write_text(
        "# publishers we accept\n"
        f"{encode_publisher_public(a.public)} release team\n"
        "\n"
        f"   {encode_publisher_public(b.public)}\t# ci\n"
        f"{encode_publisher_public(a.public)} duplicate\n"
    )
    assert load_trusted(path) == (a.public, b.public)
    assert load_trusted(str(path)) == (a.public, b.public)
    (tmp_path / "empty").write_text("# nobody\n")
    assert load_trusted(tmp_path / "empty") == ()


@pytest.mark.parametrize(
    "line",
    ["x25519:" + "A" * 43, "ed25519:tooshort", "ed25519-private:" + "A" * 43, "garbage here"],
)
def test_trust_file_malformed_line_is_refused(tmp_path: Path, line: str) -> None:
    good = encode_publisher_public(PublisherKey.generate().public)
    path = tmp_path / "trusted"
    path.write_text(f"{good}\n# ok\n{line}\n")
    with pytest.raises(UsageError, match=r"trusted:3:"):
        load_trusted(path)


def test_trust_folder(tmp_path: Path) -> None:
    a = generate_publisher(tmp_path / "keys" / "a")
    b = PublisherKey.generate()
    folder = tmp_path / "trust"
    folder.mkdir()
    shutil.copy(tmp_path / "keys" / "a" / "publisher.pub", folder / "a.pub")
    (folder / "b.pub").write_text(encode_publisher_public(b.public) + " bob\n")
    (folder / "README").write_text("not a key file; ignored\n")
    assert set(load_trusted(folder)) == {a.public, b.public}
    # A publisher key directory is a folder of one *.pub file; its private key is not read.
    assert load_trusted(tmp_path / "keys" / "a") == (a.public,)
    (folder / "bad.pub").write_text("ed25519:nope\n")
    with pytest.raises(UsageError, match=r"bad\.pub:1"):
        load_trusted(folder)
    with pytest.raises(UsageError, match="does not exist"):
        load_trusted(tmp_path / "nowhere")


# --- command line --------------------------------------------------------------------------


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_keys_sign_verify(capsys, bundle_dir: Path, tmp_path: Path) -> None:
    keydir = tmp_path / "pub"
    code, out, err = _run(capsys, "keys", "generate", "--publisher", str(keydir))
    assert code == 0, err
    key = load_publisher(keydir)
    assert encode_publisher_public(key.public) in out and key.fingerprint in out
    code, out, _ = _run(capsys, "keys", "show", str(keydir))
    assert code == 0 and key.fingerprint in out and "publisher key" in out
    code, _, err = _run(capsys, "keys", "generate", "--publisher", str(keydir))
    assert code == 2 and "already exists" in err

    code, out, err = _run(capsys, "verify", str(bundle_dir), "--trust", str(keydir))
    assert code == 5 and "not signed" in err and "Traceback" not in err

    code, out, err = _run(capsys, "sign", str(bundle_dir), "--key", str(keydir), "--json")
    assert code == 0, err
    assert json.loads(out) == json.loads((bundle_dir / SIGNATURE).read_text())

    code, out, err = _run(capsys, "verify", str(bundle_dir), "--trust", str(keydir))
    assert code == 0, err
    assert key.fingerprint in out
    trust_file = tmp_path / "trusted"
    trust_file.write_text(encode_publisher_public(key.public) + " us\n")
    code, out, _ = _run(capsys, "verify", str(bundle_dir), "--trust", str(trust_file), "--json")
    assert code == 0 and json.loads(out)["fingerprint"] == key.fingerprint

    code, out, _ = _run(capsys, "inspect", str(bundle_dir))
    assert code == 0 and f"signature: publisher {key.fingerprint}" in out and "valid" in out

    other = tmp_path / "other"
    assert _run(capsys, "keys", "generate", "--publisher", str(other))[0] == 0
    code, _, err = _run(capsys, "verify", str(bundle_dir), "--trust", str(other))
    assert code == 5 and key.fingerprint in err and "not a trusted publisher" in err
    # Several --trust: the union.
    code, _, _ = _run(
        capsys, "verify", str(bundle_dir), "--trust", str(other), "--trust", str(keydir)
    )
    assert code == 0

    # Same manifest, other bytes (compact JSON): still a valid bundle, no longer what was signed.
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest))
    code, _, err = _run(capsys, "verify", str(bundle_dir), "--trust", str(keydir))
    assert code == 5 and "modified after" in err
    code, out, _ = _run(capsys, "inspect", str(bundle_dir))  # hashes still match; stale sig
    assert code == 0 and "STALE" in out

    trust_file.write_text("ed25519:broken\n")
    code, _, err = _run(capsys, "verify", str(bundle_dir), "--trust", str(trust_file))
    assert code == 2 and "trusted:1" in err


def test_cli_sign_needs_a_publisher_key(capsys, bundle_dir: Path, tmp_path: Path) -> None:
    assert _run(capsys, "keys", "generate", str(tmp_path / "device"))[0] == 0
    code, _, err = _run(capsys, "sign", str(bundle_dir), "--key", str(tmp_path / "device"))
    assert code == 2 and "publisher.key" in err and "--publisher" in err
    code, out, _ = _run(capsys, "keys", "show", str(tmp_path / "device"))
    assert code == 0 and "publisher key" not in out
