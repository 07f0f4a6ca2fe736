"""``sign`` and ``verify``: publisher signatures over bundles (edgeoffload.signing)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from edgeoffload.cli._render import out
from edgeoffload.signing import (
    encode_publisher_public,
    load_publisher,
    load_trusted,
    publisher_fingerprint,
    sign_bundle,
    verified_bundle,
)


def sign(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle folder written by split.")],
    key: Annotated[
        Path,
        typer.Option(
            "--key", help="Publisher key folder (edgeoffload keys generate --publisher DIR)."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print signature.json.")] = False,
) -> None:
    """Sign a bundle's manifest with a publisher key (writes signature.json).

    The bundle's hashes are verified first. Sign last: export-ort and a re-split rewrite the
    manifest and remove the signature.
    """
    publisher = load_publisher(key)
    document = sign_bundle(bundle_dir, publisher)
    if as_json:
        out.print_json(json.dumps(document))
        return
    out.print(
        f"signed {bundle_dir / 'manifest.json'} (sha256 {document['signed'][:16]}…) "
        f"as publisher {publisher.fingerprint}; wrote {bundle_dir / 'signature.json'}"
    )


def verify(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle folder to check.")],
    trust: Annotated[
        list[Path],
        typer.Option(
            "--trust",
            help="Trusted publisher keys: a file (one 'ed25519:...' per line) or a folder of "
            "*.pub files. Repeat to trust several.",
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Check that a bundle is signed by a trusted publisher and unmodified since.

    Exit code 0 when it is; otherwise 5 with what failed: unsigned, unknown publisher, bad
    signature (manifest modified after signing) or a part modified after signing.
    """
    trusted: list[bytes] = []
    for path in trust:
        trusted.extend(k for k in load_trusted(path) if k not in trusted)
    bundle = verified_bundle(bundle_dir, trusted)
    publisher = bundle.publisher or b""
    fp = publisher_fingerprint(publisher)
    if as_json:
        out.print_json(
            json.dumps(
                {
                    "bundle": str(bundle.path),
                    "version": bundle.manifest.version,
                    "publisher": encode_publisher_public(publisher),
                    "fingerprint": fp,
                }
            )
        )
        return
    out.print(
        f"bundle {bundle.path}: signed by trusted publisher {fp}; signature and all hashes "
        f"verified (version {bundle.manifest.version})"
    )
