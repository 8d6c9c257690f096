"""The ``dfbf`` command line: parses, reports, and maps failures to stable exit codes."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from dfbf_cli import __version__
from dfbf_cli.errors import EXIT_INTERNAL, DfbfError, exhausted

app = typer.Typer(
    name="dfbf",
    help="Compress trained vision models without their training data.\n\n"
    "Exit codes: 0 success, 1 a quality gate failed, 2 bad usage or input, 3 internal error, 130 interrupted.\n\n"
    "YOLO checkpoints are read with Ultralytics' restricted loader (no code runs from a file); "
    "DFBF_TRUST_CHECKPOINTS=1 loads one it refuses, for files you trust.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        print(f"dfbf {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Compress trained vision models without their training data."""


from dfbf_cli.cli import compress, evaluate, export, finetune, prune, synthesize  # noqa: E402

app.command("compress")(compress.compress_command)
app.command("synthesize")(synthesize.synthesize_command)
app.command("prune")(prune.prune_command)
app.command("finetune")(finetune.finetune_command)
app.command("eval")(evaluate.eval_command)
app.command("export")(export.export_command)


def main() -> None:
    """Entry point. Typer maps usage errors to exit 2 and Ctrl-C to 130; here a user mistake
    (:class:`DfbfError`) or an exhausted resource becomes one sentence and its exit code, and a bug a traceback and exit 3."""
    errors = Console(stderr=True)
    try:
        app()
    except Exception as error:
        known = error if isinstance(error, DfbfError) else exhausted(error)  # a mistake, or a disk or memory that ran out
        if known is not None:
            if os.environ.get("RANK", "0") == "0":  # under torchrun every rank meets the same mistake: rank 0 says it
                errors.print(f"[bold red]Error:[/] {escape(str(known))}", highlight=False, soft_wrap=True)
            sys.exit(known.exit_code)
        traceback.print_exc()
        errors.print(f"[bold red]Internal error[/] (dfbf {__version__}): please report it with the traceback above.")
        sys.exit(EXIT_INTERNAL)
