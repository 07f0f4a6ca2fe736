"""The ``edgeoffload`` command line.

``main(argv) -> int`` never lets a traceback reach the user for errors they can cause: every
:class:`~edgeoffload.errors.EdgeOffloadError` becomes one ``edgeoffload: error: ...`` line,
an optional ``hint:`` line, and the error's documented exit code (see errors.py). A missing
optional part (onnx for splitting, matplotlib for --plot, ...) is a MissingExtra (exit 12).

The commands live in one module per group (split, serve, device, keys, sign, bench); the options
they share in _options.py, everything that prints results in _render.py. Heavy modules
(onnx, torch, matplotlib, the runtime) are imported inside the commands that need them.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer

from edgeoffload import __version__
from edgeoffload.cli import bench, device, serve, sign, split
from edgeoffload.cli._extras import missing_extra
from edgeoffload.cli._render import err, out
from edgeoffload.cli.fleet import fleet_app
from edgeoffload.cli.keys import keys_app
from edgeoffload.errors import EdgeOffloadError

app = typer.Typer(
    name="edgeoffload",
    help="Split ONNX models between a device and a nearby edge server.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# Registration order is the order `edgeoffload --help` lists the commands in.
app.command()(split.cuts)
app.command()(split.profile)
app.command()(split.split)
app.command("export-ort")(split.export_ort)
app.command()(device.chat)
app.command()(split.export)
app.command()(device.demo)
app.command()(serve.serve)
app.command("run")(device.run_cmd)
app.command()(split.inspect)
app.command()(sign.sign)
app.command()(sign.verify)
app.command()(bench.bench)
app.add_typer(keys_app, name="keys")
app.add_typer(fleet_app, name="fleet")


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Log progress details.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(name)s: %(message)s",
    )
    if version:
        out.print(f"edgeoffload {__version__}")
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        out.print(ctx.get_help())


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        try:
            result = app(args=args, prog_name="edgeoffload", standalone_mode=False)
        except ModuleNotFoundError as exc:
            command = next((a for a in args if not a.startswith("-")), "")
            missing = missing_extra(exc, what=f"edgeoffload {command}".strip())
            if missing is None:
                raise
            raise missing from None
        return result if isinstance(result, int) else 0
    except EdgeOffloadError as exc:
        err.print(f"edgeoffload: error: {exc.message}", markup=False)
        if exc.hint:
            err.print(f"hint: {exc.hint}", markup=False)
        return exc.exit_code
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.TyperException as exc:  # usage errors: bad option, missing argument
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            err.print(f"edgeoffload: error: {exc.format_message()}", markup=False)
        return int(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err.print("edgeoffload: interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
