"""``keys``: long-term identity keys for devices and edge servers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgeoffload.cli._render import out
from edgeoffload.keys import encode_public, generate_identity, load_identity

keys_app = typer.Typer(
    help="Long-term X25519 keys for devices and edge servers.", no_args_is_help=True
)


@keys_app.command("generate")
def keys_generate(
    directory: Annotated[
        Path, typer.Argument(help="Folder for private.key (0600) and public.key.")
    ],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key.")] = False,
) -> None:
    """Create a new identity key pair."""
    identity = generate_identity(directory, overwrite=force)
    out.print(f"public key:  {encode_public(identity.public)}")
    out.print(f"fingerprint: {identity.fingerprint}")
    out.print(f"private key: {directory / 'private.key'} (mode 0600; never share it)")


@keys_app.command("show")
def keys_show(
    directory: Annotated[Path, typer.Argument(help="Key folder written by keys generate.")],
) -> None:
    """Print the public key and fingerprint of an identity."""
    identity = load_identity(directory)
    out.print(f"public key:  {encode_public(identity.public)}")
    out.print(f"fingerprint: {identity.fingerprint}")
