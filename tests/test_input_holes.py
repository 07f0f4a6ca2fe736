"""Inputs the checks must refuse: tensor shapes a bundle cannot serve, unsafe private key files.

The tensors are real: numpy arrays encoded with the project's codec, put in tensor maps, packed
and unpacked with the strict msgpack reader, then held against a manifest's specs exactly as
the edge server does (``decode_tensors`` then ``decode_checked``).
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import numpy as np
import pytest

from edgeoffload import keys as keys_mod
from edgeoffload.core import codec as codec_mod
from edgeoffload.errors import PayloadError, UsageError
from edgeoffload.keys import PRIVATE_FILE, generate_identity, load_identity
from edgeoffload.protocol.tensors import (
    check_against_specs,
    decode_checked,
    decode_tensors,
    encode_tensors,
)
from edgeoffload.protocol.wire import pack, unpack
from edgeoffload.types import TensorSpec

# A cut of a small encoder: hidden states and the mask built near layer 0 cross.
SPECS = (
    TensorSpec("hidden", "float32", ("batch", "sequence_length", 8)),
    TensorSpec("mask", "int64", ("batch", "sequence_length")),
)
CODEC = codec_mod.CodecSpec.parse("lz4")  # lossless: a decoded array must equal the sent one
MAX_BYTES = 1 << 20


def _codec_for(dtype: str) -> str:
    return codec_mod.codec_for_dtype(CODEC, dtype).name


def _arrays(batch: int, seq: int, mask_seq: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    return {
        "hidden": rng.standard_normal((batch, seq, 8)).astype(np.float32),
        "mask": rng.integers(0, 2, size=(batch, seq if mask_seq is None else mask_seq)),
    }


def _over_the_wire(arrays: dict[str, np.ndarray]):
    """Encode, frame, pack, unpack and structurally decode, as device and server do."""
    encoded = [(name, codec_mod.encode(a, CODEC)) for name, a in arrays.items()]
    wire = pack({"tensors": encode_tensors(encoded)})
    return decode_tensors(unpack(wire, max_bin=MAX_BYTES)["tensors"], "request")


def _decode(arrays: dict[str, np.ndarray], **kwargs):
    return decode_checked(_over_the_wire(arrays), SPECS, _codec_for, max_bytes=MAX_BYTES, **kwargs)


# -- shapes ---------------------------------------------------------------------------------------


def test_a_valid_request_decodes_to_the_exact_arrays():
    sent = _arrays(2, 5)
    got = _decode(sent, max_dims={"batch": 2, "sequence_length": 5})
    assert sorted(got) == ["hidden", "mask"]
    for name, array in sent.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape
        np.testing.assert_array_equal(got[name], array)


@pytest.mark.parametrize(("batch", "seq", "dim"), [(0, 5, "'batch'"), (2, 0, "'sequence_length'")])
def test_a_zero_symbolic_dim_is_rejected(batch, seq, dim):
    with pytest.raises(PayloadError) as info:
        _decode(_arrays(batch, seq))
    message = info.value.message
    assert "'hidden'" in message and dim in message and "is 0" in message


def test_a_zero_fixed_dim_is_rejected():
    # A bundle that declares a zero-size dim still cannot be fed an empty tensor.
    specs = (TensorSpec("x", "float32", (1, 0)),)
    tensors = _over_the_wire({"x": np.zeros((1, 0), dtype=np.float32)})
    with pytest.raises(PayloadError, match=r"tensor 'x': dim 1 is 0"):
        decode_checked(tensors, specs, _codec_for, max_bytes=MAX_BYTES)


def test_a_zero_batch_is_rejected_even_within_max_dims():
    with pytest.raises(PayloadError, match=r"dim 0 \('batch'\) is 0"):
        _decode(_arrays(0, 5), max_dims={"batch": 4})


def test_a_symbolic_dim_must_bind_to_one_value_across_tensors():
    with pytest.raises(PayloadError) as info:
        _decode(_arrays(1, 5, mask_seq=6))
    message = info.value.message
    assert "'mask'" in message and "'sequence_length'" in message
    assert "6 here but 5 elsewhere" in message


@pytest.mark.parametrize(
    ("batch", "seq", "max_dims", "match"),
    [
        (3, 5, {"batch": 2}, r"tensor 'hidden': dim 0 \('batch'\) is 3, above the limit of 2"),
        (
            1,
            9,
            {"batch": 4, "sequence_length": 8},
            r"tensor 'hidden': dim 1 \('sequence_length'\) is 9, above the limit of 8",
        ),
    ],
)
def test_a_symbolic_dim_above_its_max_is_rejected(batch, seq, max_dims, match):
    with pytest.raises(PayloadError, match=match):
        _decode(_arrays(batch, seq), max_dims=max_dims)
    # the same request is fine without the bound (existing behaviour is kept)
    _decode(_arrays(batch, seq))


def test_max_dims_at_the_limit_and_for_unused_names_are_accepted():
    got = _decode(_arrays(4, 8), max_dims={"batch": 4, "sequence_length": 8, "unused": 0})
    assert got["hidden"].shape == (4, 8, 8)


def test_check_against_specs_takes_max_dims_too():
    tensors = _over_the_wire(_arrays(3, 2))
    check_against_specs(tensors, SPECS, codec_for=_codec_for, max_dims={"batch": 3})
    with pytest.raises(PayloadError, match="limit of 2"):
        check_against_specs(tensors, SPECS, codec_for=_codec_for, max_dims={"batch": 2})


# -- the private key file -------------------------------------------------------------------------

posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX file types, modes and owners")


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    d = tmp_path / "k"
    generate_identity(d)
    return d


def test_a_good_private_key_is_accepted(key_dir: Path) -> None:
    first = load_identity(key_dir)
    assert load_identity(key_dir) == first
    assert stat.S_IMODE((key_dir / PRIVATE_FILE).stat().st_mode) == 0o600


@posix_only
def test_a_symlinked_private_key_is_rejected(key_dir: Path, tmp_path: Path) -> None:
    # The link points at a perfectly good key file (ours, mode 0600): only the link is wrong.
    real = tmp_path / "elsewhere.key"
    (key_dir / PRIVATE_FILE).rename(real)
    (key_dir / PRIVATE_FILE).symlink_to(real)
    with pytest.raises(UsageError) as info:
        load_identity(key_dir)
    assert "symbolic link" in info.value.message
    assert str(key_dir / PRIVATE_FILE) in (info.value.hint or "")
    # replacing the link with the file it points to fixes it
    (key_dir / PRIVATE_FILE).unlink()
    real.rename(key_dir / PRIVATE_FILE)
    load_identity(key_dir)


@posix_only
def test_a_dangling_symlink_is_rejected_as_a_symlink(key_dir: Path, tmp_path: Path) -> None:
    (key_dir / PRIVATE_FILE).unlink()
    (key_dir / PRIVATE_FILE).symlink_to(tmp_path / "missing.key")
    with pytest.raises(UsageError, match="symbolic link"):
        load_identity(key_dir)


def test_a_directory_named_private_key_is_rejected(tmp_path: Path) -> None:
    d = tmp_path / "k"
    (d / PRIVATE_FILE).mkdir(parents=True, mode=0o700)
    with pytest.raises(UsageError) as info:
        load_identity(d)
    assert "not a regular file" in info.value.message or "cannot read" in info.value.message
    if os.name != "nt":
        assert "a directory" in info.value.message
        assert info.value.hint


@posix_only
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_a_fifo_named_private_key_is_rejected_without_blocking(tmp_path: Path) -> None:
    d = tmp_path / "k"
    d.mkdir(mode=0o700)
    fifo = d / PRIVATE_FILE
    os.mkfifo(fifo, 0o600)
    # A blocking open of a FIFO waits for a writer forever. So that such a regression fails
    # instead of hanging the suite, a watchdog plays the writer if the load has not returned
    # after a while; its open succeeds only while a reader is stuck in open().
    done, rescued = threading.Event(), threading.Event()

    def watchdog() -> None:
        if not done.wait(30):
            os.close(os.open(fifo, os.O_WRONLY))
            rescued.set()

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        with pytest.raises(UsageError, match="a FIFO"):
            load_identity(d)
    finally:
        done.set()
    assert not rescued.is_set(), "load_identity blocked opening a FIFO"


@posix_only
@pytest.mark.parametrize("mode", [0o640, 0o620, 0o610, 0o604, 0o602, 0o601])
def test_a_private_key_accessible_by_group_or_others_is_rejected(key_dir: Path, mode: int) -> None:
    path = key_dir / PRIVATE_FILE
    path.chmod(mode)
    with pytest.raises(UsageError) as info:
        load_identity(key_dir)
    assert "too open" in info.value.message and f"{mode:04o}" in info.value.message
    assert info.value.hint == f"chmod 600 {path}"
    path.chmod(0o600)
    load_identity(key_dir)


@posix_only
@pytest.mark.skipif(not hasattr(os, "getuid"), reason="needs os.getuid")
def test_a_private_key_owned_by_another_user_is_rejected(
    key_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The file is ours; pretending to be another user is what makes its owner foreign.
    # (What is under test is our owner check, not the OS.)
    owner = (key_dir / PRIVATE_FILE).stat().st_uid
    other = owner + 1
    monkeypatch.setattr(keys_mod.os, "getuid", lambda: other)
    with pytest.raises(UsageError) as info:
        load_identity(key_dir)
    assert f"owned by uid {owner}" in info.value.message
    assert f"uid {other}" in info.value.message
    assert info.value.hint is not None and f"chown {other}" in info.value.hint
    monkeypatch.setattr(keys_mod.os, "getuid", lambda: owner)
    load_identity(key_dir)


def test_the_owner_check_is_skipped_without_getuid(
    key_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(keys_mod.os, "getuid", raising=False)
    load_identity(key_dir)
