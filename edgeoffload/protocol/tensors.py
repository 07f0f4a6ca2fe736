"""The tensor schema of the wire protocol (PROTOCOL.md §8): tensor maps in and out.

:func:`encode_tensors` writes the tensor maps of a message, :func:`decode_tensors` reads them
back with structural checks, :func:`check_against_specs` holds them against what a bundle
declares, and :func:`decode_checked` does both checks and then decodes the arrays. Tensors whose
structure is valid but whose content lies are a :class:`~edgeoffload.errors.PayloadError` (the
request fails, the connection stays); a malformed map is a protocol error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from edgeoffload.core import codec as codec_mod
from edgeoffload.core.codec import ALLOWED_DTYPES, EncodedTensor
from edgeoffload.errors import PayloadError, RemoteProtocolError
from edgeoffload.protocol.wire import MAX_DIMS, MAX_TENSORS, StrictMap
from edgeoffload.types import TensorSpec, match_specs


def encode_tensors(tensors: Sequence[tuple[str, EncodedTensor]]) -> list[dict[str, Any]]:
    """Tensor maps for a message; "data" comes last so that pack_parts can stream it."""
    items = []
    for name, t in tensors:
        item: dict[str, Any] = {
            "name": name,
            "dtype": t.dtype,
            "shape": list(t.shape),
            "codec": t.codec,
        }
        if t.scales:
            item["scales"] = t.scales
        item["data"] = t.data
        items.append(item)
    return items


def decode_tensors(raw: Any, what: str) -> tuple[tuple[str, EncodedTensor], ...]:
    """Structural checks only; byte lengths are checked by codec.decode and the manifest."""
    if not isinstance(raw, list) or len(raw) > MAX_TENSORS:
        raise RemoteProtocolError(f"{what}: 'tensors' must be a list of at most {MAX_TENSORS}")
    out: list[tuple[str, EncodedTensor]] = []
    names: set[str] = set()
    for entry in raw:
        if not isinstance(entry, dict):
            raise RemoteProtocolError(f"{what}: each tensor must be a map")
        m = StrictMap(entry, f"{what} tensor")
        name = m.get("name", str)
        dtype = m.get("dtype", str)
        shape = m.get("shape", list)
        codec = m.get("codec", str)
        data = m.get("data", bytes)
        scales = m.get("scales", bytes, optional=True) or b""
        m.done()
        if name in names:
            raise PayloadError(f"tensor {name!r} appears twice")
        names.add(name)
        if dtype not in ALLOWED_DTYPES:
            raise PayloadError(f"tensor {name!r}: dtype {dtype!r} is not allowed")
        if len(shape) > MAX_DIMS or not all(type(d) is int and d >= 0 for d in shape):
            raise PayloadError(f"tensor {name!r}: shape must be at most {MAX_DIMS} ints >= 0")
        out.append((name, EncodedTensor(dtype, tuple(shape), codec, data, scales)))
    return tuple(out)


def check_against_specs(
    tensors: Sequence[tuple[str, EncodedTensor]],
    specs: Sequence[TensorSpec],
    *,
    codec_for: Callable[[str], str],
    fixed_dims: Mapping[str, int] | None = None,
    max_dims: Mapping[str, int] | None = None,
    allow_empty: bool = False,
) -> None:
    """The tensors must be exactly the declared ones, with matching dtype, shape and codec.

    Symbolic dims must agree across tensors (every ``batch`` has one value); dims named in
    ``fixed_dims`` must equal that value, and dims named in ``max_dims`` must be at most that
    value (the name is the dim exactly as the manifest spells it, e.g. ``"batch"`` or
    ``"past_sequence_length+sequence_length"``; names the specs do not use are ignored). No
    dim may be 0 unless ``allow_empty`` (a request's empty tensor is nothing a bundle can
    serve; a model's *output* may legitimately be empty, e.g. no detections). Byte lengths are
    then checked by ``codec.decode``.

    Raises:
        PayloadError: naming the tensor (and the dim) that does not fit.
    """
    match_specs(
        [(name, t.dtype, t.shape) for name, t in tensors],
        specs,
        error=PayloadError,
        fixed_dims=fixed_dims,
    )
    declared = {s.name: s for s in specs}
    for name, t in tensors:
        # match_specs has checked the names and ranks, so the spec exists and zip is exact.
        for axis, (size, dim) in enumerate(zip(t.shape, declared[name].shape, strict=True)):
            label = f"dim {axis}" + (f" ({dim!r})" if isinstance(dim, str) else "")
            if size == 0 and not allow_empty:
                raise PayloadError(f"tensor {name!r}: {label} is 0; empty tensors are not accepted")
            limit = max_dims.get(dim) if isinstance(dim, str) and max_dims else None
            if limit is not None and size > limit:
                raise PayloadError(
                    f"tensor {name!r}: {label} is {size}, above the limit of {limit}"
                )
        wanted = codec_for(t.dtype)
        if t.codec != wanted:
            raise PayloadError(f"tensor {name!r}: codec {t.codec!r}, the bundle uses {wanted!r}")


def decode_checked(
    tensors: Sequence[tuple[str, EncodedTensor]],
    specs: Sequence[TensorSpec],
    codec_for: Callable[[str], str],
    *,
    max_bytes: int,
    fixed_dims: Mapping[str, int] | None = None,
    max_dims: Mapping[str, int] | None = None,
    allow_empty: bool = False,
) -> dict[str, np.ndarray]:
    """Validate encoded tensors against declared specs, then decode them (PayloadError).

    The checks are :func:`check_against_specs`'s (``fixed_dims``, ``max_dims`` and
    ``allow_empty`` go to it);
    then every tensor's byte length is checked against its shape while it is decoded.
    """
    check_against_specs(
        tensors,
        specs,
        codec_for=codec_for,
        fixed_dims=fixed_dims,
        max_dims=max_dims,
        allow_empty=allow_empty,
    )
    out: dict[str, np.ndarray] = {}
    for name, encoded in tensors:
        try:
            out[name] = codec_mod.decode(encoded, max_bytes=max_bytes)
        except PayloadError as exc:
            raise PayloadError(f"tensor {name!r}: {exc.message}") from None
    return out
