"""The device runtime: run a bundle's head, prepare what crosses, run the tail locally.

Light by design (the device path): onnxruntime + numpy + the stdlib bundle loader. The tail
session is created only when it is first needed (local fallback), so a device that always
offloads never pays for it. Each part loads from its ORT-format copy (``head.ort``, written by
``edgeoffload export-ort``) when the bundle has one, unless ``model_format="onnx"``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgeoffload._ort import make_session, run
from edgeoffload.bundle import Bundle, load_bundle
from edgeoffload.core import codec as codec_mod
from edgeoffload.errors import OffloadUnavailable, UsageError
from edgeoffload.types import TensorSpec, match_specs


def check_inputs(
    inputs: Mapping[str, Any], specs: tuple[TensorSpec, ...], dims: Mapping[str, int]
) -> dict[str, np.ndarray]:
    """Inputs as C-contiguous numpy arrays, checked against the bundle's graph inputs.

    A caller's mistake, so a :class:`UsageError` (the same rules as a peer's tensors,
    :func:`edgeoffload.types.match_specs`).
    """
    arrays: dict[str, np.ndarray] = {}
    for name, value in inputs.items():
        try:
            # order="C", not ascontiguousarray: that one turns a 0-d array into shape [1].
            arrays[name] = np.asarray(value, order="C")
        except (ValueError, TypeError) as exc:
            raise UsageError(f"input {name!r} is not an array: {exc}") from None
    match_specs(
        [(name, a.dtype.name, a.shape) for name, a in arrays.items()],
        specs,
        error=UsageError,
        kind="input",
        hint="the model takes " + ", ".join(f"{s.name} {s.dtype}{list(s.shape)}" for s in specs),
    )
    return arrays


class DeviceRuntime:
    """Head execution and local tail fallback for one bundle.

    ``model_format`` (:data:`edgeoffload.bundle.MODEL_FORMATS`): "auto" runs each part's
    ``.ort`` when the manifest pins one and its ``.onnx`` otherwise; "onnx" always the ``.onnx``;
    "ort" requires an ORT-format head (a ManifestError if the bundle has none). Both files were
    verified against the manifest's hashes when the bundle was loaded.
    """

    def __init__(
        self, bundle: Bundle | str | Path, *, threads: int = 1, model_format: str = "auto"
    ) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.manifest = self.bundle.manifest
        self.threads = threads
        self.model_format = model_format
        head_path = self.bundle.part_path("head", model_format)
        tail_path = self.bundle.part_path("tail", "onnx" if model_format == "onnx" else "auto")
        # A device bundle installed by an update carries no tail (it stays on the server,
        # PROTOCOL.md §16): such a runtime has no local fallback.
        self._tail_path = tail_path if tail_path is not None and tail_path.is_file() else None
        self.head_file = head_path.name if head_path else None  # which encoding runs
        self._head = make_session(head_path, threads=threads) if head_path else None
        self._tail: Any = None
        self._tail_lock = threading.Lock()
        self._codec = codec_mod.CodecSpec.parse(self.manifest.codec)

    @property
    def has_tail(self) -> bool:
        """Whether the tail can run here (a bundle that has one, and its file)."""
        return self._tail_path is not None

    def check_inputs(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return check_inputs(inputs, self.manifest.graph_inputs, self.manifest.dims)

    def run_head(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The crossing tensors (head outputs plus passed-through inputs), in manifest order."""
        produced = run(self._head, inputs) if self._head is not None else {}
        produced.update({name: inputs[name] for name in self.manifest.passthrough})
        if self.manifest.tail is None:  # all-local bundle: the head's outputs are the result
            return produced
        return {t.name: produced[t.name] for t in self.manifest.crossing}

    def codec_for(self, dtype: str) -> str:
        return codec_mod.codec_for_dtype(self._codec, dtype).name

    def encode(
        self, crossing: Mapping[str, np.ndarray]
    ) -> list[tuple[str, codec_mod.EncodedTensor]]:
        return [(name, codec_mod.encode(array, self._codec)) for name, array in crossing.items()]

    @property
    def head_session(self) -> Any:
        """The head's onnxruntime session (None for an all-remote bundle)."""
        return self._head

    def tail_session(self) -> Any:
        """The tail's session on the device, created on first use (the local fallback)."""
        if self._tail_path is None:
            return None
        with self._tail_lock:
            if self._tail is None:
                self._tail = make_session(self._tail_path, threads=self.threads)
        return self._tail

    def run_tail_locally(self, crossing: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The fallback: the tail on the device, on the same (codec-decoded) values."""
        if self.bundle.tail_path is None:
            return dict(crossing)
        if self._tail_path is None:
            raise OffloadUnavailable(
                f"bundle {self.bundle.path} has no tail on this device: it cannot run locally",
                hint="an updated device bundle holds only the head; the server runs the tail",
            )
        return run(self.tail_session(), crossing)

    def run_local(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Head and tail both on the device (what ``fallback="local"`` computes)."""
        arrays = self.check_inputs(inputs)
        return self.run_tail_locally(self.run_head(arrays))
