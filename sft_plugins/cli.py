"""The ``sft-plugins`` command (also ``python -m sft_plugins``).

Each subcommand is a small function here or in its own module under ``sft_plugins.commands``;
``main`` is the click group they hang from.
"""

from __future__ import annotations

import json
import logging
import sys
import typing

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sft_plugins._version import __version__
from sft_plugins.errors import SFTPluginsError
from sft_plugins.manager import PluginManager, get_plugin_manager


def _describe(exc: BaseException) -> str:
    """One line for an error the machine or the input caused rather than our code: a file
    that cannot be read or written, text that is not UTF-8, input nested past the recursion
    limit."""
    if isinstance(exc, OSError) and exc.filename is not None:
        target = exc.filename + (f" -> {exc.filename2}" if exc.filename2 else "")
        return f"{target}: {exc.strerror or exc}"
    if isinstance(exc, UnicodeDecodeError):
        return (f"a file is not valid {exc.encoding} text ({exc.reason} at byte {exc.start}); "
                "convert it to UTF-8")
    if isinstance(exc, RecursionError):
        return "the input is nested too deeply to process (past Python's recursion limit)"
    return f"{type(exc).__name__}: {exc}"


class _Group(click.Group):
    """Turns our own errors, and the I/O and encoding errors that bad input or a full or
    read-only disk cause, into one clear line and exit status 2, never a traceback; Ctrl-C into
    ``interrupted`` and status 130, as shells report it."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except SFTPluginsError as exc:
            _fail(str(exc))
        except click.UsageError as exc:  # a bad flag or argument: one line, no usage block
            command = exc.ctx.command_path if exc.ctx is not None else "sft-plugins"
            _fail(f"{command}: {exc.format_message()} (see {command} --help)")
        except (OSError, UnicodeError, RecursionError) as exc:
            _fail(_describe(exc))
        except KeyboardInterrupt:  # Ctrl-C outside training (or twice in it): the shell's status
            Console(stderr=True).print("\ninterrupted", highlight=False)
            sys.exit(130)


def _fail(message: str) -> typing.NoReturn:
    console = Console(stderr=True, soft_wrap=True)
    # one line, also when the message quotes a dependency's own (transformers' hub errors
    # hold a newline)
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    # the message is text: "sft-plugins[qlora]" must not be read as a style tag
    console.print(f"[bold red]error:[/] {escape(line)}", highlight=False)
    sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sft-plugins")
def main() -> None:
    """Supervised fine-tuning with pluggable chat templates, loss masks and embedding noise."""


def _rows(manager: PluginManager) -> dict[str, list[dict[str, object]]]:
    kinds = {"templates": manager.templates, "collators": manager.collators,
             "perturbers": manager.perturbers}
    listing: dict[str, list[dict[str, object]]] = {
        kind: [{"name": e.name, "aliases": list(e.aliases), "plugin": e.plugin,
                "description": e.description} for e in registry]
        for kind, registry in kinds.items()
    }
    listing["errors"] = [
        {"plugin": err.plugin, "distribution": err.distribution, "error": str(err)}
        for err in manager.errors
    ]
    return listing


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def list_command(as_json: bool) -> None:
    """List every registered chat template, collator and perturber, and broken plugins."""
    listing = _rows(get_plugin_manager())
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    console = Console()
    for kind in ("templates", "collators", "perturbers"):
        table = Table(title=kind.capitalize(), title_justify="left")
        table.add_column("name", no_wrap=True, style="bold")
        table.add_column("aliases")
        table.add_column("plugin", overflow="fold")
        table.add_column("description", ratio=1)
        for row in listing[kind]:
            table.add_row(*(escape(text) for text in (  # template text such as [/INST]
                str(row["name"]), ", ".join(row["aliases"]),  # type: ignore[arg-type]
                str(row["plugin"]), str(row["description"]))))
        console.print(table)
    for error in listing["errors"]:
        console.print(f"[bold red]broken plugin[/] {escape(str(error['plugin']))}: "
                      f"{escape(str(error['error']))}", highlight=False)


class _Dropped(logging.Filter):
    """Drops a dependency's log records that hold one of ``fragments``: warnings that would
    stand above a command's output, one-line errors included, and say nothing the user can act
    on."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def _quiet_dependencies() -> None:
    # bitsandbytes, on import on CPUs with AVX512-BF16 (the commands import peft, which imports
    # it): it could not fetch its optional 4-bit CPU kernel from the hub, and uses its own
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        _Dropped("Failed to load CPU gemm_4bit_forward"))
    # huggingface_hub, while it retries a request it could not send (a hub name given offline,
    # or a local path mistyped into one): five more attempts, two lines each, before the error
    # that names what could not be loaded
    logging.getLogger("huggingface_hub.utils._http").addFilter(
        _Dropped("thrown while requesting", "Retrying in"))


def _attach_subcommands() -> None:
    _quiet_dependencies()
    from sft_plugins.commands.chat import chat_command
    from sft_plugins.commands.check_data import check_data_command
    from sft_plugins.commands.demo import demo_command
    from sft_plugins.commands.doctor import doctor_command
    from sft_plugins.commands.render import render_command
    from sft_plugins.commands.train import train_command

    for command in (render_command, doctor_command, check_data_command, train_command,
                    chat_command, demo_command):
        main.add_command(command)


_attach_subcommands()
