"""What the command line says, and where: one object for every command.

stdout carries data only (images, JSON lines, tables asked for); everything for a person goes to stderr:
`error: ` and `warning: ` lines (each one line: control characters escaped), progress lines unless quiet or
JSON, and a progress bar only when stderr is a terminal. rich is set up here and nowhere else.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import click


def printable(text: str) -> str:
    """`text` with control characters escaped as Python writes them (a newline in a file name becomes \\n),
    so that every message stays one line."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in text)


class Reporter:
    """The quiet/JSON rules in one place: `error` always, `warning` unless quiet, `info` unless quiet or JSON."""

    def __init__(self, quiet: bool = False, as_json: bool = False, stdout=None):
        self.quiet, self.as_json = quiet, as_json
        self.stdout = stdout  # where data goes; None: sys.stdout when written (a cluster run points that elsewhere)

    def error(self, message: str) -> None:
        click.echo(f"error: {printable(message)}", err=True)

    def warning(self, message: str) -> None:
        if not self.quiet:
            click.echo(f"warning: {printable(message)}", err=True)

    def status(self, message: str) -> None:
        """A line on stderr that is always said (how an interrupted run ended)."""
        click.echo(printable(message), err=True)

    def note(self, message: str) -> None:
        """A line on stderr unless quiet, JSON mode included (stdout holds the records there): a pause's reason."""
        if not self.quiet:
            click.echo(printable(message), err=True)

    def info(self, message: str) -> None:
        if not (self.quiet or self.as_json):
            click.echo(printable(message), err=True)

    def record(self, obj: dict[str, Any]) -> None:
        """One JSON object on its own line of stdout."""
        click.echo(json.dumps(obj), file=self.stdout)

    def line(self, text: str) -> None:
        """A line of data on stdout (a dry run's plan)."""
        click.echo(printable(text), file=self.stdout)

    @contextmanager
    def progress(self, label: str, total: int | None) -> Iterator[Callable[..., None] | None]:
        """A transient progress bar on stderr when a person watches (a terminal, not quiet); yields
        `update(advance=1)` or `update(completed=, total=)`, or None when no bar is shown."""
        if self.quiet or not sys.stderr.isatty():
            yield None
            return
        from rich.progress import Progress

        bar = Progress(console=self._console(stderr=True), transient=True)
        task = bar.add_task(label, total=total)
        bar.start()
        try:
            yield lambda **changes: bar.update(task, **changes)
        finally:
            bar.stop()

    def table(self, table) -> None:
        """A rich table on stdout; written to a file or a pipe it keeps its width (rich would squeeze it into
        80 columns and cut the figures short)."""
        self.console().print(table)

    def console(self):
        return self._console(stderr=False)

    @staticmethod
    def _console(stderr: bool):
        from rich.console import Console

        stream = sys.stderr if stderr else sys.stdout
        return Console(stderr=stderr, soft_wrap=True, width=None if stream.isatty() else 150)


#: for messages outside a command's own reporter (click's errors, the group's handlers)
DEFAULT = Reporter()
