"""What every command shares: the console, the ``--config`` option, the command context
(settings and database set-up, errors as exit codes), listings and JSON on stdout.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.errors import MarkupError
from rich.table import Table
from rich.text import Text

from dicom_ai.config import Settings, load_settings
from dicom_ai.exceptions import DicomAIError
from dicom_ai.logs import setup_logging

if TYPE_CHECKING:  # the index is opened lazily: `version` and `--help` stay fast
    from storage.db import Database


console = Console(stderr=True)


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (else DICOM_AI_CONFIG, else defaults).",
                 envvar="DICOM_AI_CONFIG"),
]


def _settings(config: Path | None) -> Settings:
    try:
        settings = load_settings(config)
    except DicomAIError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    setup_logging(settings.logging)
    return settings


def _database(settings: Settings) -> Database:
    """The index database of `settings`, migrated to the current schema."""
    from storage.db import Database

    db = Database(settings.storage.url)
    db.upgrade()
    return db


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {exc}")
    return typer.Exit(1)


class CommandContext:
    """What one command run uses: its settings and its index database, each made on first use.

    A command that never reads the index (``models``, ``send``) does not open it, and one that
    needs neither loads nothing.
    """

    def __init__(self, config: Path | None) -> None:
        self._config = config
        self._settings: Settings | None = None
        self._db: Database | None = None

    @property
    def settings(self) -> Settings:
        """The settings of ``--config`` (logging set up); a bad config file exits with code 2."""
        if self._settings is None:
            self._settings = _settings(self._config)
        return self._settings

    @property
    def db(self) -> Database:
        """The index database, migrated to the current schema on first use."""
        if self._db is None:
            self._db = _database(self.settings)
        return self._db

    def close(self) -> None:
        """Dispose of the database's connections if it was opened."""
        db, self._db = self._db, None
        if db is not None:
            db.dispose()


@contextmanager
def command_context(config: Path | None = None, *,
                    fails: tuple[type[Exception], ...] = ()) -> Iterator[CommandContext]:
    """The context a command runs in: ``with command_context(config) as ctx:``.

    Parameters
    ----------
    config
        The ``--config`` file (None: DICOM_AI_CONFIG, else the defaults).
    fails
        Exception types, besides :class:`~dicom_ai.exceptions.DicomAIError`, that are the
        user's error here (printed as one line, exit code 1) rather than a bug (a traceback).

    Yields
    ------
    CommandContext
        ``ctx.settings`` and ``ctx.db``, made on first use; the database is disposed of when the
        block ends, however it ends.
    """
    ctx = CommandContext(config)
    caught: tuple[type[Exception], ...] = (DicomAIError, *fails)
    try:
        yield ctx
    except caught as exc:
        raise _fail(exc) from None
    finally:
        ctx.close()


def _print_json(value: Any) -> None:
    """Print views (dicom_ai.views: the API's output schemas) as indented JSON on stdout."""
    from dicom_ai.views import dump

    typer.echo(json.dumps(dump(value), indent=2))


def _more(rows: list[Any], limit: int) -> None:
    """Tell (on stderr) how to get the next page when this one is full."""
    if rows and len(rows) == limit:
        console.print(f"more: --after {rows[-1].id}", highlight=False)


def _page(rows: list[Any], limit: int, as_json: bool) -> bool:
    """Show one page of a listing's views: how to get the next page (stderr), the page itself
    as JSON on stdout when ``as_json``.

    Returns
    -------
    bool
        Whether the page was printed (else the caller prints it as a table).
    """
    _more(rows, limit)
    if as_json:
        _print_json(rows)
    return as_json


LimitOption = Annotated[int, typer.Option(min=1, max=500, help="Page size (at most 500).")]


AfterOption = Annotated[int | None, typer.Option(
    min=0, help="The last id of the previous page (newest first: the next older rows).")]


def _cell_text(cell: Any) -> str:
    """A table cell's plain text (its markup removed)."""
    if isinstance(cell, Text):
        return cell.plain
    try:
        return Text.from_markup(str(cell)).plain
    except MarkupError:
        return str(cell)


def _emit(table: Table) -> None:
    """Print a listing on stdout, never truncated.

    On a terminal: the rich table, long values folded onto more lines instead of cut with an
    ellipsis. Otherwise (piped, redirected, captured): a header line and one line per row,
    tab-separated, full values (tabs and line breaks inside a value become spaces).
    """
    out = Console()
    if out.is_terminal:
        for column in table.columns:
            column.overflow, column.no_wrap = "fold", False
        out.print(table)
        return
    columns = table.columns
    lines = ["\t".join(_cell_text(c.header) for c in columns)]
    cells = [list(c.cells) for c in columns]
    for row in range(table.row_count):
        lines.append("\t".join(
            " ".join(_cell_text(col[row]).split()) if row < len(col) else "" for col in cells))
    typer.echo("\n".join(lines))

