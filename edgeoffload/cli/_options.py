"""Options and arguments that several commands share, declared once, and their parsers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgeoffload.errors import UsageError

ModelArg = Annotated[
    str,
    typer.Argument(
        help="ONNX file, or zoo:NAME for an embedded model (zoo:mobilenetv2, zoo:resnet, "
        "zoo:encoder, zoo:minilm).",
        show_default=False,
    ),
]
DimOpt = Annotated[
    list[str] | None,
    typer.Option("--dim", help="Value of a symbolic input dim, NAME=INT (repeatable)."),
]
InputOpt = Annotated[
    Path | None,
    typer.Option("--input", help="Sample inputs (.npz, one array per model input)."),
]
NetworkOpt = Annotated[
    str, typer.Option("--network", help="Link preset (3g, lte, wifi, ethernet) or RATE/RTT.")
]
DeviceProfileOpt = Annotated[
    Path | None,
    typer.Option("--device-profile", help="Device profile JSON (default: measure this machine)."),
]
ServerProfileOpt = Annotated[
    Path | None,
    typer.Option("--server-profile", help="Server profile JSON (default: measure this machine)."),
]
DeviceClassOpt = Annotated[
    str,
    typer.Option(
        "--device",
        help="The device, as slowdowns of its profile calibrated from published benchmarks: "
        "rpi4, rpi5, pi-zero-2, phone-mid, phone-flagship, this-machine, or a factor such as "
        "3.5 (phone and rpi: deprecated, = phone-mid and rpi4). Best: a profile measured on "
        "the device (edgeoffload profile) with --device this-machine.",
    ),
]
CodecOpt = Annotated[
    str, typer.Option("--codec", help="auto, none, zstd, lz4, fp16, int8, int8c (+zstd/+lz4).")
]
ThreadsOpt = Annotated[
    int, typer.Option("--threads", min=1, help="Threads per side when measuring.")
]

# The device side of the protocol (`run`, `chat`).
ServerUrlOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--server",
        help="Edge server ws://HOST:PORT, or URL=KEY (KEY: public key text, file or folder); "
        "repeat for a fleet.",
    ),
]
ServerKeyOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--server-key",
        help="Server public key, or its key file/folder: the key of a lone --server, and the "
        "keys --discover trusts (repeatable).",
    ),
]
FleetFileOpt = Annotated[
    Path | None,
    typer.Option("--fleet", help="File of edge servers, one 'URL KEY' per line ('#' comments)."),
]
DiscoverOpt = Annotated[
    bool,
    typer.Option(
        "--discover",
        help="Also use servers found on the local network (mDNS) whose key is given here.",
    ),
]
DeviceKeyOpt = Annotated[Path, typer.Option("--key", help="This device's key folder.")]
FallbackOpt = Annotated[str, typer.Option("--fallback", help="local or error.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds per request.")]


def parse_dims(items: list[str] | None) -> dict[str, int]:
    """``--dim NAME=INT`` values as a mapping."""
    dims: dict[str, int] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.strip().isdigit() or int(value) <= 0:
            raise UsageError(f"--dim {item!r}: expected NAME=POSITIVE_INT, e.g. --dim sequence=128")
        dims[name.strip()] = int(value)
    return dims


def load_inputs(path: Path | None) -> dict[str, Any] | None:
    """The arrays of an ``--input`` .npz file (None without one)."""
    if path is None:
        return None
    import numpy as np  # not at module top: only commands that read inputs pay for it

    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise UsageError(f"--input {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"--input {path}: not a readable .npz file ({exc})") from None
