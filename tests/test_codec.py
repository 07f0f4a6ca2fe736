"""Tests for edgeoffload.core.codec: round trips, error bounds, spec parsing, hostile payloads."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import hypothesis.extra.numpy as hnp
import lz4.block
import numpy as np
import numpy.typing as npt
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeoffload.core.codec import (
    ALLOWED_DTYPES,
    COMPRESSIONS,
    FP16_MAX,
    MAX_TENSOR_BYTES,
    QUANTS,
    CodecSpec,
    EncodedTensor,
    codec_for_dtype,
    decode,
    encode,
    max_abs_error,
)
from edgeoffload.errors import PayloadError, UsageError

ALL_SPECS = [CodecSpec(q, c) for q, c in itertools.product(QUANTS, COMPRESSIONS)]
LOSSLESS_SPECS = [s for s in ALL_SPECS if s.lossless]
LOSSY_SPECS = [s for s in ALL_SPECS if not s.lossless]

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)


def _same_bits(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
    )


def _abs_error(decoded: npt.NDArray[Any], original: npt.NDArray[Any]) -> float:
    finite = np.isfinite(original)
    diff = np.abs(decoded.astype(np.float64)[finite] - original.astype(np.float64)[finite])
    return float(np.max(diff, initial=0.0))


def _encoded(**changes: Any) -> EncodedTensor:
    base = encode(np.arange(16, dtype=np.float32).reshape(4, 4), CodecSpec())
    return dataclasses.replace(base, **changes)


# --- spec parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name)
def test_parse_name_round_trip(spec: CodecSpec) -> None:
    assert CodecSpec.parse(spec.name) == spec
    assert CodecSpec.parse(f"{spec.quant}+{spec.compression}") == spec
    assert CodecSpec.parse(f"  {spec.quant.upper()}+{spec.compression} ") == spec
    assert spec.lossless == (spec.quant == "none")


def test_canonical_names() -> None:
    names = {s.name for s in ALL_SPECS}
    assert len(names) == len(ALL_SPECS)
    assert CodecSpec().name == "none"
    assert CodecSpec(compression="zstd").name == "zstd"
    assert CodecSpec("fp16").name == "fp16"
    assert CodecSpec("int8c", "lz4").name == "int8c+lz4"


@pytest.mark.parametrize(
    "text",
    ["", "+", "fp32", "gzip", "zstd+fp16", "fp16+zstd+lz4", "int8+", "+zstd", "fp16 zstd", "int4"],
)
def test_bad_spec_text(text: str) -> None:
    with pytest.raises(UsageError, match="valid codecs"):
        CodecSpec.parse(text)


def test_bad_spec_fields() -> None:
    with pytest.raises(UsageError):
        CodecSpec(quant="int4")
    with pytest.raises(UsageError):
        CodecSpec(compression="gzip")


def test_codec_for_dtype() -> None:
    spec = CodecSpec("int8", "zstd")
    assert codec_for_dtype(spec, "float32") == spec
    assert codec_for_dtype(spec, "float64") == spec
    assert codec_for_dtype(spec, "float16") == CodecSpec("none", "zstd")
    assert codec_for_dtype(CodecSpec("fp16"), "int64") == CodecSpec()
    enc = encode(np.arange(10, dtype=np.int64), spec)
    assert enc.codec == "zstd"
    assert enc.scales == b""


# --- round trips -----------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("dtype", ALLOWED_DTYPES)
def test_lossless_round_trip_exact(dtype: str, data: st.DataObject) -> None:
    array = data.draw(hnp.arrays(np.dtype(dtype), shapes))
    specs = LOSSLESS_SPECS if dtype in ("float32", "float64") else ALL_SPECS
    for spec in specs:
        encoded = encode(array, spec)
        assert codec_for_dtype(spec, dtype).name == encoded.codec
        decoded = decode(encoded)
        assert _same_bits(decoded, array), spec.name
        assert max_abs_error(spec, array) == 0.0


def test_none_fast_path_is_zero_copy_read_only() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    encoded = encode(array, CodecSpec())
    assert encoded.data == array.tobytes()
    decoded = decode(encoded)
    assert not decoded.flags.writeable
    assert np.shares_memory(decoded, np.frombuffer(encoded.data, dtype=np.uint8))


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name)
def test_big_endian_and_strided_input(spec: CodecSpec) -> None:
    array = np.arange(24, dtype=">f4").reshape(4, 6)[:, ::2]
    decoded = decode(encode(array, spec))
    assert decoded.dtype == np.dtype("float32")
    assert decoded.shape == (4, 3)
    assert _abs_error(decoded, array) <= max_abs_error(spec, array)


finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(array=hnp.arrays(np.float32, shapes, elements=finite32))
@pytest.mark.parametrize("spec", LOSSY_SPECS, ids=lambda s: s.name)
def test_lossy_float32_within_bound(spec: CodecSpec, array: npt.NDArray[np.float32]) -> None:
    encoded = encode(array, spec)
    decoded = decode(encoded)
    assert decoded.dtype == np.float32
    assert decoded.shape == array.shape
    assert np.isfinite(decoded).all()  # fp16 saturates, never inf
    assert _abs_error(decoded, array) <= max_abs_error(spec, array)


@settings(max_examples=40, deadline=None)
@given(array=hnp.arrays(np.float64, shapes, elements=st.floats(-1e30, 1e30)))
@pytest.mark.parametrize("spec", LOSSY_SPECS, ids=lambda s: s.name)
def test_lossy_float64_within_bound(spec: CodecSpec, array: npt.NDArray[np.float64]) -> None:
    decoded = decode(encode(array, spec))
    assert decoded.dtype == np.float64
    assert _abs_error(decoded, array) <= max_abs_error(spec, array)


@pytest.mark.parametrize("spec", LOSSY_SPECS, ids=lambda s: s.name)
def test_all_zero(spec: CodecSpec) -> None:
    array = np.zeros((2, 3, 4), dtype=np.float32)
    encoded = encode(array, spec)
    assert _same_bits(decode(encoded), array)
    if spec.quant.startswith("int8"):
        scales = np.frombuffer(encoded.scales, dtype="<f4")
        assert (scales == 1.0).all()


def test_fp16_saturates_but_keeps_inf_and_nan() -> None:
    array = np.array([1e6, -1e30, 65519.0, 65520.0, np.inf, -np.inf, np.nan, 1.0], np.float32)
    decoded = decode(encode(array, CodecSpec("fp16")))
    expected = [FP16_MAX, -FP16_MAX, FP16_MAX, FP16_MAX, np.inf, -np.inf, np.nan, 1.0]
    np.testing.assert_array_equal(decoded, np.array(expected, dtype=np.float32))
    assert max_abs_error(CodecSpec("fp16"), array) == pytest.approx(1e30 - FP16_MAX)


def test_fp16_relative_and_subnormal_bound() -> None:
    assert max_abs_error(CodecSpec("fp16"), np.array([1000.0], np.float32)) == 1000.0 * 2**-11
    assert max_abs_error(CodecSpec("fp16"), np.array([1e-9], np.float32)) == 2.0**-25


def test_int8c_uses_one_scale_per_channel() -> None:
    array = (
        np.ones((2, 5, 3, 3), dtype=np.float32) * np.arange(1, 6, dtype=np.float32)[:, None, None]
    )
    encoded = encode(array, CodecSpec("int8c"))
    scales = np.frombuffer(encoded.scales, dtype="<f4")
    np.testing.assert_allclose(scales, np.arange(1, 6) / 127, rtol=1e-6)
    np.testing.assert_allclose(decode(encoded), array, rtol=1e-6)
    assert len(encode(np.ones(7, np.float32), CodecSpec("int8c")).scales) == 4
    assert len(encode(array, CodecSpec("int8")).scales) == 4


@pytest.mark.parametrize("quant", ["int8", "int8c"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_int8_rejects_non_finite(quant: str, bad: float) -> None:
    array = np.array([[1.0, bad], [2.0, 3.0]], dtype=np.float32)
    with pytest.raises(PayloadError, match="NaN or inf"):
        encode(array, CodecSpec(quant))


def test_int8_rejects_float64_beyond_float32_scale() -> None:
    with pytest.raises(PayloadError, match="beyond float32 range"):
        encode(np.array([1e300]), CodecSpec("int8"))


@pytest.mark.parametrize("dtype", ["object", "<U4", "complex64", "int16", "datetime64[s]"])
def test_encode_rejects_dtype(dtype: str) -> None:
    with pytest.raises(PayloadError, match="not allowed"):
        encode(np.zeros(3, dtype=dtype), CodecSpec())


def test_wire_bytes_smaller_with_zstd() -> None:
    rng = np.random.default_rng(0)
    relu = np.maximum(rng.standard_normal((64, 256)).astype(np.float32), 0)
    plain = encode(relu, CodecSpec())
    assert plain.wire_bytes == relu.nbytes
    assert encode(relu, CodecSpec.parse("zstd")).wire_bytes < plain.wire_bytes
    assert encode(relu, CodecSpec.parse("lz4")).wire_bytes < plain.wire_bytes
    int8 = encode(relu, CodecSpec.parse("int8"))
    assert int8.wire_bytes == relu.size + 4


# --- hostile decode inputs -------------------------------------------------------------------


def test_wrong_data_length() -> None:
    good = _encoded()
    with pytest.raises(PayloadError, match="63 bytes, expected 64"):
        decode(dataclasses.replace(good, data=good.data[:-1]))
    with pytest.raises(PayloadError, match="65 bytes, expected 64"):
        decode(dataclasses.replace(good, data=bytes(good.data) + b"\0"))


@pytest.mark.parametrize(
    "shape", [(-1,), (4, -4), (2**40,), (2**20, 2**20), (0, 2**62), (1.5,), (True, 16), ("4",)]
)
def test_bad_shapes(shape: tuple[Any, ...]) -> None:
    with pytest.raises(PayloadError, match="shape"):
        decode(_encoded(shape=shape))


def test_too_many_dims_and_bad_shape_type() -> None:
    with pytest.raises(PayloadError, match="dimensions"):
        decode(_encoded(shape=(1,) * 40))
    with pytest.raises(PayloadError, match="shape must be"):
        decode(_encoded(shape="4x4"))


def test_max_bytes_tightens_limit() -> None:
    assert decode(_encoded(), max_bytes=64).shape == (4, 4)
    with pytest.raises(PayloadError, match="limit is 63 bytes"):
        decode(_encoded(), max_bytes=63)
    with pytest.raises(UsageError):
        decode(_encoded(), max_bytes=-1)
    assert MAX_TENSOR_BYTES == 1 << 31


@pytest.mark.parametrize("dtype", ["object", "<U4", "float128", "O", "", "FLOAT32"])
def test_decode_rejects_dtype(dtype: str) -> None:
    with pytest.raises(PayloadError, match="not allowed"):
        decode(_encoded(dtype=dtype))


@pytest.mark.parametrize("codec", ["gzip", "none+zstd", "ZSTD", "int8+gzip", ""])
def test_decode_rejects_unknown_or_non_canonical_codec(codec: str) -> None:
    with pytest.raises(PayloadError, match="codec"):
        decode(_encoded(codec=codec))


def test_decode_rejects_quant_on_integer_dtype() -> None:
    with pytest.raises(PayloadError, match="cannot apply"):
        decode(_encoded(dtype="int32", codec="int8", scales=b"\0\0\x80?"))


def test_decode_rejects_non_bytes_fields() -> None:
    with pytest.raises(PayloadError, match="data must be bytes"):
        decode(_encoded(data=[0] * 64))
    with pytest.raises(PayloadError, match="scales must be bytes"):
        decode(_encoded(scales=None))


def _bomb_shape() -> tuple[int, ...]:
    return (16,)  # 64 bytes of float32 expected


def test_zstd_bomb_with_declared_size() -> None:
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(64 << 20))
    assert len(bomb) < 4096
    enc = EncodedTensor("float32", _bomb_shape(), "zstd", bomb)
    with pytest.raises(PayloadError, match=r"declares 67108864 bytes, expected 64 bytes"):
        decode(enc)


def test_zstd_bomb_without_declared_size() -> None:
    cctx = zstandard.ZstdCompressor(level=19, write_content_size=False)
    bomb = cctx.compress(bytes(64 << 20))
    assert zstandard.frame_content_size(bomb) == -1
    with pytest.raises(PayloadError, match="does not decompress to 64 bytes"):
        decode(EncodedTensor("float32", _bomb_shape(), "zstd", bomb))
    with pytest.raises(PayloadError, match="without a content size"):
        decode(EncodedTensor("float32", (0,), "zstd", bomb))


def test_zstd_short_trailing_and_garbage() -> None:
    cctx = zstandard.ZstdCompressor(level=1)
    short = cctx.compress(bytes(60))
    with pytest.raises(PayloadError, match="declares 60 bytes, expected 64"):
        decode(EncodedTensor("float32", _bomb_shape(), "zstd", short))
    trailing = cctx.compress(bytes(64)) + b"junk"
    with pytest.raises(PayloadError, match="unused data"):
        decode(EncodedTensor("float32", _bomb_shape(), "zstd", trailing))
    with pytest.raises(PayloadError, match="not a zstd frame"):
        decode(EncodedTensor("float32", _bomb_shape(), "zstd", b"garbage!"))


def test_lz4_bomb_short_and_garbage() -> None:
    bomb = lz4.block.compress(bytes(64 << 20), store_size=False)
    with pytest.raises(PayloadError, match="lz4 payload does not decompress to 64 bytes"):
        decode(EncodedTensor("float32", _bomb_shape(), "lz4", bomb))
    short = lz4.block.compress(bytes(60), store_size=False)
    with pytest.raises(PayloadError, match="60 bytes, expected 64"):
        decode(EncodedTensor("float32", _bomb_shape(), "lz4", short))
    with pytest.raises(PayloadError):
        decode(EncodedTensor("float32", _bomb_shape(), "lz4", b"\xff" * 8))


@pytest.mark.parametrize("quant", ["int8", "int8c"])
def test_bad_scales_length(quant: str) -> None:
    good = encode(np.ones((2, 3, 4), np.float32), CodecSpec(quant))
    for scales in (b"", good.scales[:-1], good.scales + b"\0\0\x80?"):
        with pytest.raises(PayloadError, match="bytes of scales"):
            decode(dataclasses.replace(good, scales=scales))
    with pytest.raises(PayloadError, match="0 bytes of scales, found 4"):
        decode(_encoded(scales=b"\0\0\x80?"))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 0.0, -1.0, 3e38])
def test_bad_scale_values(bad: float) -> None:
    good = encode(np.ones((2, 3), np.float32), CodecSpec("int8c"))
    scales = np.frombuffer(good.scales, dtype="<f4").copy()
    scales[1] = bad
    with pytest.raises(PayloadError, match="finite, positive"):
        decode(dataclasses.replace(good, scales=scales.astype("<f4").tobytes()))


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name)
def test_every_codec_rejects_truncated_payload(spec: CodecSpec) -> None:
    enc = encode(np.linspace(-1, 1, 64, dtype=np.float32), spec)
    with pytest.raises(PayloadError):
        decode(dataclasses.replace(enc, data=enc.data[: len(enc.data) // 2]))
