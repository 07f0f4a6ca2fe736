"""Tensor codec: quantise and compress the tensors that cross a model cut.

Pure core: no I/O, deterministic, no clocks or randomness. The device runs :func:`encode` on its
hot path (before encryption); the peer runs :func:`decode` on bytes that came off the network, so
decode treats every field of an :class:`EncodedTensor` as hostile and validates it in Python
ints before it allocates anything.

A codec is ``<quant>[+<compression>]`` (see :meth:`CodecSpec.parse`):

=========  ==================================================================================
quant      meaning
=========  ==================================================================================
``none``   the bytes of the array, unchanged (lossless)
``fp16``   IEEE half precision; finite values beyond +-65504 saturate to +-65504 (they do not
           become inf); inf and NaN are kept. Per element
           ``|x - y| <= max(|x| * 2**-11, 2**-25)`` for ``|x| <= 65504``
           and ``|x| - 65504`` beyond.
``int8``   symmetric per-tensor: ``scale = max|x| / 127`` (1.0 when all zero),
           ``q = round(x / scale)`` clipped to [-127, 127], ``y = q * scale``.
``int8c``  as ``int8`` with one scale per channel (axis 1 when ``ndim >= 2``, otherwise one
           scale for the tensor).
=========  ==================================================================================

int8 error: ``|x - y| <= scale / 2`` in exact arithmetic; the float32 arithmetic of encode and
decode adds at most ``scale * 2**-15`` more, so :func:`max_abs_error` returns
``scale * (0.5 + 2**-15)`` (largest scale for ``int8c``). Scales are float32; the scale of a
tensor whose ``max|x| / 127`` is below the smallest normal float32 is clamped to ``2**-126``
(the bound still holds), and one that would round past ``float32max / 127`` is clamped so that
dequantising never overflows. NaN or inf cannot be int8-quantised (:class:`PayloadError`), nor
can float64 values beyond the float32 range.

Quantisation applies only to float32 and float64 arrays (:func:`codec_for_dtype`); float16 arrays
keep quant ``none`` (fp16 would be the identity, and int8 would need a third rounding to float16
on decode that breaks the documented bound for a 2x saving at most). Every other dtype also keeps
quant ``none`` but keeps the compression. :func:`encode` applies this rule itself and records the
codec it actually applied in :attr:`EncodedTensor.codec`.

Compression is zstd (level :data:`ZSTD_LEVEL`, one frame with its content size) or an lz4 block
without a stored size (the size is known from dtype and shape). Compressor objects are reused per
thread (``threading.local``): zstandard's are not thread-safe, and a fresh one costs ~5 us per
call.

Decoded arrays have the original dtype and shape. When quant is ``none`` the result is a
zero-copy, **read-only** view of the payload bytes (``numpy.frombuffer``); call ``.copy()`` for a
writable array. Dequantised results are freshly allocated and writable.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass
from typing import Any, Final

import lz4.block
import numpy as np
import numpy.typing as npt
import zstandard

from edgeoffload.errors import PayloadError, UsageError

__all__ = [
    "ALLOWED_DTYPES",
    "COMPRESSIONS",
    "FP16_MAX",
    "MAX_NDIM",
    "MAX_TENSOR_BYTES",
    "QUANTS",
    "ZSTD_LEVEL",
    "CodecSpec",
    "EncodedTensor",
    "codec_for_dtype",
    "decode",
    "encode",
    "max_abs_error",
]

QUANTS: Final = ("none", "fp16", "int8", "int8c")
COMPRESSIONS: Final = ("none", "zstd", "lz4")
ALLOWED_DTYPES: Final = (
    "float32",
    "float16",
    "float64",
    "int64",
    "int32",
    "int8",
    "uint8",
    "bool",
)

MAX_TENSOR_BYTES: Final = 1 << 31
"""Upper bound on one tensor's decoded size in bytes (``decode(max_bytes=...)`` tightens it)."""

MAX_NDIM: Final = 32
"""Most dimensions a tensor may have (numpy 1.x's limit; numpy 2 allows 64)."""

ZSTD_LEVEL: Final = 1
FP16_MAX: Final = 65504.0

_QUANTISABLE: Final = ("float32", "float64")
_FP16_REL: Final = 2.0**-11
_FP16_ABS: Final = 2.0**-25
_FP16_OVERFLOW: Final = 65520.0  # smallest magnitude that rounds to inf in float16
_INT8_SLACK: Final = 2.0**-15
_F32_MAX: Final = float(np.finfo(np.float32).max)
_F32_TINY: Final = float(np.finfo(np.float32).tiny)  # 2**-126, smallest normal float32


def _largest_scale() -> float:
    s = np.float32(_F32_MAX / 127.0)
    while float(s) * 127.0 > _F32_MAX:
        s = np.nextafter(s, np.float32(0.0))
    return float(s)


# Largest float32 scale with 127 * scale <= float32 max, so dequantising never overflows.
_SCALE_MAX: Final = _largest_scale()

_ITEMSIZE: Final = {name: np.dtype(name).itemsize for name in ALLOWED_DTYPES}
# Little-endian wire dtypes; "<" is a no-op for one-byte types.
_WIRE_DTYPE: Final = {name: np.dtype(name).newbyteorder("<") for name in ALLOWED_DTYPES}
_F16_LE: Final = np.dtype("float16").newbyteorder("<")
_F32_LE: Final = np.dtype("float32").newbyteorder("<")
_I8: Final = np.dtype("int8")

_VALID_FORMS = (
    "valid codecs: none | fp16 | int8 | int8c | zstd | lz4 | <quant>+<compression> "
    "(e.g. fp16+zstd, int8+lz4)"
)


@dataclass(frozen=True)
class CodecSpec:
    """Which quantisation and which compression to apply to a tensor."""

    quant: str = "none"
    compression: str = "none"

    def __post_init__(self) -> None:
        if self.quant not in QUANTS:
            raise UsageError(
                f"unknown quantisation {self.quant!r}; expected one of {', '.join(QUANTS)}",
                hint=_VALID_FORMS,
            )
        if self.compression not in COMPRESSIONS:
            raise UsageError(
                f"unknown compression {self.compression!r}; "
                f"expected one of {', '.join(COMPRESSIONS)}",
                hint=_VALID_FORMS,
            )

    @classmethod
    def parse(cls, text: str) -> CodecSpec:
        """Parse ``"none"``, ``"<quant>"``, ``"<compression>"`` or ``"<quant>+<compression>"``.

        Case and surrounding whitespace are ignored; ``none`` is accepted in either position
        (``"none+zstd"`` is ``"zstd"``).

        Raises:
            UsageError: the text is not one of the valid forms (the message lists them).
        """
        spec = _parse_or_none(text)
        if spec is None:
            raise UsageError(f"invalid codec {text!r}; {_VALID_FORMS}", hint=_VALID_FORMS)
        return spec

    @property
    def name(self) -> str:
        """Canonical text form; ``CodecSpec.parse(spec.name) == spec``."""
        if self.compression == "none":
            return self.quant
        if self.quant == "none":
            return self.compression
        return f"{self.quant}+{self.compression}"

    @property
    def lossless(self) -> bool:
        """True when decode reproduces the input bit for bit."""
        return self.quant == "none"


def _parse_or_none(text: object) -> CodecSpec | None:
    if not isinstance(text, str):
        return None
    parts = text.strip().lower().split("+")
    if len(parts) == 1:
        (word,) = parts
        if word in QUANTS:
            return CodecSpec(quant=word)
        if word in COMPRESSIONS:
            return CodecSpec(compression=word)
        return None
    if len(parts) == 2:
        quant, compression = (p.strip() for p in parts)
        if quant in QUANTS and compression in COMPRESSIONS:
            return CodecSpec(quant=quant, compression=compression)
    return None


@dataclass(frozen=True)
class EncodedTensor:
    """A tensor as it travels: original dtype and shape, applied codec, payload, scales."""

    dtype: str
    shape: tuple[int, ...]
    codec: str
    data: bytes | memoryview  # a zero-copy view of the array for uncompressed codecs
    scales: bytes = b""

    @property
    def wire_bytes(self) -> int:
        """Bytes this tensor puts on the wire (payload + scales; framing not included)."""
        return len(self.data) + len(self.scales)


def codec_for_dtype(spec: CodecSpec, dtype: str) -> CodecSpec:
    """The codec actually applied to an array of ``dtype``.

    Quantisation applies to float32 and float64 only; every other dtype (float16 included)
    keeps quant ``none`` and the requested compression.
    """
    if spec.quant == "none" or dtype in _QUANTISABLE:
        return spec
    return CodecSpec(quant="none", compression=spec.compression)


# --- compression -----------------------------------------------------------------------------

_local = threading.local()


def _zstd_compressor() -> zstandard.ZstdCompressor:
    try:
        cctx: zstandard.ZstdCompressor = _local.cctx
    except AttributeError:
        cctx = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return cctx


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    try:
        dctx: zstandard.ZstdDecompressor = _local.dctx
    except AttributeError:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def _compress(compression: str, buf: npt.NDArray[Any]) -> bytes | memoryview:
    """Compress the bytes of a C-contiguous array without copying it first.

    Without compression the result is a zero-copy view of ``buf`` (the caller's array for
    codec ``none``): a 4 MiB copy is ~10% of the whole wire path. Keep the array unchanged
    until the encoded tensor has been sent.
    """
    if compression == "none":
        if buf.size == 0:
            return b""
        return memoryview(buf.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
    if compression == "zstd":
        return _zstd_compressor().compress(buf.data)
    try:
        out: bytes = lz4.block.compress(buf, store_size=False)
    except (lz4.block.LZ4BlockError, ValueError, OverflowError) as exc:
        raise PayloadError(f"lz4 cannot compress {buf.nbytes} bytes: {exc}") from exc
    return out


def _decompress(compression: str, data: bytes | memoryview, expected: int) -> bytes | memoryview:
    """Decompress ``data`` into exactly ``expected`` bytes, never allocating more."""
    if compression == "none":
        payload = data
    elif compression == "zstd":
        try:
            # decompress() ignores max_output_size when the frame declares its size, so a
            # declared size is checked first: it is what the decompressor would allocate.
            declared = zstandard.frame_content_size(data)
        except zstandard.ZstdError as exc:
            raise PayloadError(f"payload is not a zstd frame: {exc}") from exc
        if declared >= 0 and declared != expected:
            raise PayloadError(f"zstd frame declares {declared} bytes, expected {expected} bytes")
        if declared < 0 and expected == 0:
            # max_output_size=0 would mean "no limit"
            raise PayloadError("zstd frame without a content size, expected 0 bytes")
        try:
            payload = _zstd_decompressor().decompress(
                data, max_output_size=expected, allow_extra_data=False
            )
        except zstandard.ZstdError as exc:
            raise PayloadError(
                f"zstd payload does not decompress to {expected} bytes: {exc}"
            ) from exc
    else:
        try:
            payload = lz4.block.decompress(data, uncompressed_size=expected)
        except (lz4.block.LZ4BlockError, ValueError, OverflowError) as exc:
            raise PayloadError(
                f"lz4 payload does not decompress to {expected} bytes: {exc}"
            ) from exc
    if len(payload) != expected:
        what = "payload" if compression == "none" else f"{compression}-decompressed payload"
        raise PayloadError(f"{what} is {len(payload)} bytes, expected {expected} bytes")
    return payload


# --- quantisation ----------------------------------------------------------------------------


def _absmax(x: npt.NDArray[Any], axes: tuple[int, ...] | None) -> npt.NDArray[np.float64]:
    """max|x| over ``axes`` (all when None) as float64; NaN propagates; 0 for empty slices."""
    # Two reductions and no |x| temporary: cheaper than np.abs(x).max() on big tensors.
    hi = np.max(x, axis=axes, initial=0.0)
    lo = np.min(x, axis=axes, initial=0.0)
    return np.asarray(np.maximum(hi, -lo), dtype=np.float64).reshape(-1)


def _channel_axes(quant: str, ndim: int) -> tuple[int, ...] | None:
    if quant == "int8c" and ndim >= 2:
        return (0, *range(2, ndim))
    return None


def _int8_scales(quant: str, x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """float32 scales (one, or one per channel) as encode stores them."""
    m = _absmax(x, _channel_axes(quant, x.ndim))
    if not np.isfinite(m).all():
        raise PayloadError(
            f"cannot {quant}-quantise a tensor that contains NaN or inf; "
            "use codec fp16 or a lossless codec"
        )
    if (m > _F32_MAX).any():
        raise PayloadError(
            f"values up to {float(m.max()):g} are beyond float32 range, too large for {quant}; "
            "use a lossless codec"
        )
    # Clamping a scale that rounded up past _SCALE_MAX moves it by one ulp: within the bound.
    scales = np.minimum(m / 127.0, _SCALE_MAX).astype(np.float32)
    scales[m == 0.0] = 1.0
    np.maximum(scales, np.float32(_F32_TINY), out=scales)
    return scales


def _broadcast_shape(quant: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if quant == "int8c" and len(shape) >= 2:
        return (1, shape[1], *([1] * (len(shape) - 2)))
    return ()


def _quantise_int8(
    quant: str, x: npt.NDArray[Any]
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    scales = _int8_scales(quant, x)
    work = np.float32 if x.dtype == np.float32 else np.float64
    inv = (1.0 / scales.astype(work)).reshape(_broadcast_shape(quant, x.shape))
    t = np.empty(x.shape, dtype=work)
    np.multiply(x, inv, out=t)
    np.rint(t, out=t)
    # |t| <= 127 + O(2**-16) by construction; the clip guards the int8 cast against wrap-around.
    np.clip(t, -127.0, 127.0, out=t)
    return t.astype(np.int8), scales


def _quantise_fp16(x: npt.NDArray[Any]) -> npt.NDArray[np.float16]:
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    # Two cheap reductions decide whether any value can have overflowed (NaN also lands here);
    # np.isinf on the float16 result would cost several times more.
    m = float(_absmax(x, None)[0]) if x.size else 0.0
    if not m < _FP16_OVERFLOW:
        overflow = np.isinf(h) & np.isfinite(x)  # saturate finite overflow, keep real infs
        h[overflow] = np.copysign(np.float16(FP16_MAX), x[overflow]).astype(np.float16)
    return h


@functools.cache
def _fp16_table(dtype: str) -> npt.NDArray[Any]:
    """All 65536 float16 values in ``dtype``: a gather is ~5x faster than numpy's cast."""
    table = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(dtype)
    table.flags.writeable = False
    return table


def _dequantise_fp16(
    payload: bytes | memoryview, shape: tuple[int, ...], dtype: str
) -> npt.NDArray[Any]:
    bits = np.frombuffer(payload, dtype=np.dtype("<u2"), count=math.prod(shape)).reshape(shape)
    out = np.empty(shape, dtype=dtype)
    np.take(_fp16_table(dtype), bits, out=out)
    return out


# --- public API ------------------------------------------------------------------------------


def encode(array: npt.NDArray[Any], spec: CodecSpec) -> EncodedTensor:
    """Quantise and compress ``array`` with ``spec`` (as adjusted by :func:`codec_for_dtype`).

    Raises:
        PayloadError: the dtype is not in :data:`ALLOWED_DTYPES`, the array is larger than
            :data:`MAX_TENSOR_BYTES`, or int8 quantisation meets NaN, inf or float32 overflow.
    """
    if not isinstance(array, np.ndarray):
        raise PayloadError(f"expected a numpy array, found {type(array).__name__}")
    dtype = array.dtype.name
    if dtype not in _ITEMSIZE or array.dtype.kind not in "fiub":
        raise PayloadError(
            f"dtype {array.dtype.str!r} is not allowed; allowed: {', '.join(ALLOWED_DTYPES)}"
        )
    if array.nbytes > MAX_TENSOR_BYTES:
        raise PayloadError(f"tensor is {array.nbytes} bytes, the limit is {MAX_TENSOR_BYTES} bytes")
    applied = codec_for_dtype(spec, dtype)
    shape = tuple(int(d) for d in array.shape)
    # No copy when the array is already C-contiguous and little-endian.
    x = np.asarray(array, dtype=_WIRE_DTYPE[dtype], order="C")
    scales = b""
    wire: npt.NDArray[Any]
    if applied.quant == "none":
        wire = x
    elif applied.quant == "fp16":
        wire = np.asarray(_quantise_fp16(x), dtype=_F16_LE)
    else:
        q, s = _quantise_int8(applied.quant, x)
        wire = q
        scales = np.asarray(s, dtype=_F32_LE).tobytes()
    return EncodedTensor(
        dtype=dtype,
        shape=shape,
        codec=applied.name,
        data=_compress(applied.compression, wire),
        scales=scales,
    )


def decode(encoded: EncodedTensor, *, max_bytes: int | None = None) -> npt.NDArray[Any]:
    """Rebuild the array from an :class:`EncodedTensor` that may come from a hostile peer.

    Every field is checked, and the decoded size bounded, in Python ints before anything is
    allocated; decompression never produces more than the expected number of bytes.

    Args:
        encoded: the tensor as received.
        max_bytes: tighter bound than :data:`MAX_TENSOR_BYTES` on the decoded size in bytes.

    Returns:
        An array of the original dtype and shape; read-only (a view of the payload) when the
        codec is lossless, freshly allocated otherwise.

    Raises:
        PayloadError: any field is malformed or inconsistent (the message says what was
            expected and what was found).
        UsageError: ``max_bytes`` is negative.
    """
    limit = MAX_TENSOR_BYTES
    if max_bytes is not None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise UsageError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
        limit = min(limit, max_bytes)

    codec, dtype, shape = encoded.codec, encoded.dtype, encoded.shape
    if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
        raise PayloadError(
            f"dtype {dtype!r} is not allowed; expected one of {', '.join(ALLOWED_DTYPES)}"
        )
    spec = _parse_or_none(codec)
    if spec is None or spec.name != codec:
        raise PayloadError(f"unknown codec {codec!r}; expected a canonical codec name")
    if codec_for_dtype(spec, dtype) != spec:
        raise PayloadError(f"codec {codec!r} cannot apply to dtype {dtype}")

    if not isinstance(shape, (tuple, list)):
        raise PayloadError(f"shape must be a tuple of ints, found {type(shape).__name__}")
    if len(shape) > MAX_NDIM:
        raise PayloadError(f"shape has {len(shape)} dimensions, at most {MAX_NDIM} allowed")
    count = 1
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise PayloadError(
                f"shape {shape!r}: dimensions must be non-negative ints, found {d!r}"
            )
        if d > limit:  # numpy also rejects huge dims next to a zero dim
            raise PayloadError(f"shape {shape!r}: dimension {d} exceeds the {limit}-byte limit")
        count *= d
    shape = tuple(shape)
    out_bytes = count * _ITEMSIZE[dtype]
    if out_bytes > limit:
        raise PayloadError(
            f"shape {shape!r} of {dtype} decodes to {out_bytes} bytes, the limit is {limit} bytes"
        )

    if spec.quant in ("int8", "int8c"):
        channels = shape[1] if spec.quant == "int8c" and len(shape) >= 2 else 1
        wire_itemsize = 1
    else:
        channels = 0
        wire_itemsize = 2 if spec.quant == "fp16" else _ITEMSIZE[dtype]
    scales_raw = encoded.scales
    if not isinstance(scales_raw, (bytes, bytearray, memoryview)):
        raise PayloadError(f"scales must be bytes, found {type(scales_raw).__name__}")
    if len(scales_raw) != 4 * channels:
        raise PayloadError(
            f"codec {codec} with shape {shape!r} needs {4 * channels} bytes of scales, "
            f"found {len(scales_raw)}"
        )
    data = encoded.data
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"data must be bytes, found {type(data).__name__}")

    payload = _decompress(spec.compression, data, count * wire_itemsize)

    if spec.quant == "none":
        result = np.frombuffer(payload, dtype=_WIRE_DTYPE[dtype], count=count).reshape(shape)
        result.flags.writeable = False  # also when the payload is a view of a writable array
        return result
    out_dtype = np.dtype(dtype)
    if spec.quant == "fp16":
        return _dequantise_fp16(payload, shape, dtype)
    scales = np.frombuffer(scales_raw, dtype=_F32_LE, count=channels)
    if not ((scales > 0).all() and (scales <= _SCALE_MAX).all()):  # False for NaN too
        raise PayloadError(
            f"scales must be finite, positive and at most {_SCALE_MAX:g}, found {scales.tolist()!r}"
        )
    q = np.frombuffer(payload, dtype=_I8, count=count).reshape(shape)
    if q.size and q.min() == -128:
        # Encoders write -127..127; -128 with the largest scale would overflow to -inf.
        raise PayloadError("int8 code -128 is not a quantised value (encoders write -127..127)")
    s = scales.astype(out_dtype).reshape(_broadcast_shape(spec.quant, shape))
    out = np.empty(shape, dtype=out_dtype)
    np.multiply(q, s, out=out)
    return out


def max_abs_error(spec: CodecSpec, array: npt.NDArray[Any]) -> float:
    """Documented worst-case ``max |decode(encode(array, spec)) - array|`` over finite elements.

    0.0 for lossless codecs (after :func:`codec_for_dtype`). For fp16,
    ``max(m * 2**-11, 2**-25, m - 65504)`` with ``m`` the largest finite ``|x|``; for int8 and
    int8c, ``scale * (0.5 + 2**-15)`` with the largest scale encode would store.

    Raises:
        PayloadError: as :func:`encode` would for this array and spec.
    """
    dtype = array.dtype.name
    if dtype not in _ITEMSIZE:
        raise PayloadError(f"dtype {array.dtype.str!r} is not allowed")
    applied = codec_for_dtype(spec, dtype)
    if applied.lossless or array.size == 0:
        return 0.0
    if applied.quant == "fp16":
        finite = array[np.isfinite(array)]
        m = float(np.max(np.abs(finite), initial=0.0))
        return max(min(m, FP16_MAX) * _FP16_REL, _FP16_ABS, m - FP16_MAX)
    scales = _int8_scales(applied.quant, array)
    return float(scales.max(initial=0.0)) * (0.5 + _INT8_SLACK)
