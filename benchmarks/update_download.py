"""How long a device takes to download a new head over a phone's link (PROTOCOL.md §16).

Usage:  python benchmarks/update_download.py [--model zoo:smollm2] [--head-layers 2]
            [--network wifi] [--chunk-kib 256 1024] [--output results.json]

Splits the decoder twice at the same block (codec ``none`` and ``zstd``: two bundle versions
with the same interface), signs both, and serves them from a model repository (an in-process
``EdgeServer`` on 127.0.0.1) behind the link emulator with the ``--network`` preset. A device
on version 1 (``update="auto"``, a fresh store for each run) connects through the emulator,
is offered version 2 in the welcome, and ``update_now()`` downloads its manifest, signature and
head in ``--chunk-kib`` pieces, verifies them against the signed manifest and switches. Prints
bytes, seconds and the throughput beside the link's downlink rate, per chunk size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from edgeoffload.bundle import load_bundle
from edgeoffload.core.presets import LINK_PRESETS
from edgeoffload.device.client import OffloadClient
from edgeoffload.edge.allowlist import AllowList
from edgeoffload.edge.server import EdgeServer, ServerConfig
from edgeoffload.lab.harness import ThrowawayKeys
from edgeoffload.lab.linkemu import LinkEmulator, LinkShape
from edgeoffload.signing import generate_publisher, sign_bundle
from edgeoffload.split.analysis import Analysis
from edgeoffload.split.decoder_split import split_decoder
from edgeoffload.split.models import resolve_model


async def download(
    repo: Path, v1: Path, keys: ThrowawayKeys, trusted: bytes, network: str, chunk: int, store: Path
) -> dict[str, float]:
    server = EdgeServer(
        [],
        identity=keys.server,
        allow=AllowList(keys.allow_file),
        config=ServerConfig(port=0, workers=1, repository_interval=3600.0),
        repository=repo,
    )
    await server.start()
    shape = LinkShape.from_link(LINK_PRESETS[network])
    try:
        async with LinkEmulator("127.0.0.1", server.port, shape) as emu:
            client = OffloadClient(
                v1,
                server=f"ws://127.0.0.1:{emu.port}",
                server_key=keys.server.public,
                identity=keys.device,
                fallback="error",
                timeout=600.0,
                update="auto",
                store=store,
                trusted_publishers=[trusted],
                update_chunk=chunk,
            )
            try:
                await client.connect()
                if client.update_available is None:
                    raise SystemExit("the server offered no update")
                started = time.perf_counter()
                switched = await client.update_now()
                seconds = time.perf_counter() - started
                if switched is None:
                    raise SystemExit(f"no switch: {client.update_error}")
            finally:
                await client.close()
    finally:
        await server.shutdown()
    # What crossed the link: the manifest, the signature and the head part(s); files such as
    # the tokenizer are copied from the old version when their sha256 is the same.
    installed = load_bundle(store / switched, verify=False).manifest
    fetched = ["manifest.json", "signature.json", *(p.file for p in [installed.head] if p)]
    if installed.ort is not None and installed.ort.head is not None:
        fetched.append(installed.ort.head.file)
    nbytes = sum((store / switched / name).stat().st_size for name in fetched)
    return {"bytes": nbytes, "seconds": seconds, "mbit_s": nbytes * 8 / seconds / 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:smollm2")
    parser.add_argument("--head-layers", type=int, default=2)
    parser.add_argument("--network", default="wifi", choices=sorted(LINK_PRESETS))
    parser.add_argument("--chunk-kib", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    model = resolve_model(args.model)
    if not isinstance(model, Path):
        parser.error("--model must be a decoder ONNX file, folder or zoo:smollm2/tiny-llama")
    link = LINK_PRESETS[args.network]
    rows = []
    with tempfile.TemporaryDirectory(prefix="update-bench-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        analysis = Analysis.of(model)
        bundles = {
            n: split_decoder(
                model, root / f"v{n}", head_layers=args.head_layers, codec=codec, analysis=analysis
            )
            for n, codec in ((1, "none"), (2, "zstd"))
        }
        print(f"split twice in {time.perf_counter() - started:.0f} s", flush=True)
        publisher = generate_publisher(root / "publisher")
        repo = root / "repo"
        for n, bundle in bundles.items():
            sign_bundle(bundle.path, publisher)
            shutil.copytree(bundle.path, repo / "llm" / str(n))
        (repo / "llm" / "policy.json").write_text('{"policy": "latest", "count": 2}')
        keys = ThrowawayKeys.create(root / "keys")
        head = bundles[2].head_path
        assert head is not None
        print(
            f"{args.model}, {args.head_layers} blocks on the device: head {head.stat().st_size} "
            f"bytes; {args.network}: down {link.down_bps / 1e6:.1f} Mb/s, "
            f"RTT {link.rtt_ms:.0f} ms"
        )
        for kib in args.chunk_kib:
            store = root / f"store-{kib}"
            row = asyncio.run(
                download(
                    repo, bundles[1].path, keys, publisher.public, args.network, kib << 10, store
                )
            )
            row["chunk_kib"] = kib
            rows.append(row)
            print(
                f"chunk {kib:5d} KiB: {row['bytes'] / 1e6:8.1f} MB in {row['seconds']:6.1f} s "
                f"= {row['mbit_s']:5.1f} Mb/s ({row['mbit_s'] * 1e6 / link.down_bps:.0%} of the "
                "link's downlink)",
                flush=True,
            )
    if args.output:
        args.output.write_text(
            json.dumps(
                {
                    "benchmark": "update_download",
                    "model": args.model,
                    "head_layers": args.head_layers,
                    "network": args.network,
                    "rows": rows,
                    "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
