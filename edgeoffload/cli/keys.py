"""``keys``: long-term identity keys for devices and edge servers, and publisher keys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgeoffload.cli._render import out
from edgeoffload.keys import PRIVATE_FILE, encode_public, generate_identity, load_identity
from edgeoffload.signing import (
    PUBLISHER_PRIVATE_FILE,
    encode_publisher_public,
    generate_publisher,
    load_publisher,
)

keys_app = typer.Typer(
    help="Long-term X25519 keys for devices and edge servers; Ed25519 keys for publishers.",
    no_args_is_help=True,
)


@keys_app.command("generate")
def keys_generate(
    directory: Annotated[
        Path,
        typer.Argument(
            help="Folder for private.key (0600) and public.key; with --publisher, "
            "publisher.key (0600) and publisher.pub."
        ),
    ],
    publisher: Annotated[
        bool,
        typer.Option(
            "--publisher", help="Create an Ed25519 publisher key that signs bundles instead."
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key.")] = False,
) -> None:
    """Create a new identity key pair (or, with --publisher, a bundle-signing key)."""
    if publisher:
        key = generate_publisher(directory, overwrite=force)
        out.print(f"publisher key: {encode_publisher_public(key.public)}")
        out.print(f"fingerprint:   {key.fingerprint}")
        out.print(
            f"private key:   {directory / PUBLISHER_PRIVATE_FILE} (mode 0600; never share it)"
        )
        return
    identity = generate_identity(directory, overwrite=force)
    out.print(f"public key:  {encode_public(identity.public)}")
    out.print(f"fingerprint: {identity.fingerprint}")
    out.print(f"private key: {directory / 'private.key'} (mode 0600; never share it)")


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()  # a symlinked key is refused by the loader


@keys_app.command("show")
def keys_show(
    directory: Annotated[
        Path, typer.Argument(help="Key folder written by keys generate [--publisher].")
    ],
) -> None:
    """Print the public key(s) and fingerprint(s) held in a key folder."""
    has_publisher = _present(directory / PUBLISHER_PRIVATE_FILE)
    if not has_publisher or _present(directory / PRIVATE_FILE):
        identity = load_identity(directory)
        out.print(f"public key:  {encode_public(identity.public)}")
        out.print(f"fingerprint: {identity.fingerprint}")
    if has_publisher:
        key = load_publisher(directory)
        out.print(f"publisher key: {encode_publisher_public(key.public)}")
        out.print(f"fingerprint:   {key.fingerprint}")
