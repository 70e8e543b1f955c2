"""Terminal output for the command line: rich's tables and progress bars when
rich is installed (``pip install 'ckptio[cli]'``) and stdout is a terminal,
plain aligned text otherwise, so that every command works with the base
install and output piped into a file or another program is never cut to a
terminal's width nor holds ANSI escape codes."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["console", "table", "progress", "escape"]

# The rich style tags the commands use ([red] ... [/red]); other brackets in
# text (paths, "[rank 0]") are text.
_MARKUP = re.compile(r"\[/?(red|green|yellow|bold|dim)\]")


def _rich_available() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def _use_rich() -> bool:
    return _rich_available() and sys.stdout.isatty()


def escape(text: str) -> str:
    """`text` shown as it is, never read as style tags."""
    if _use_rich():
        from rich.markup import escape as rich_escape

        return rich_escape(text)
    return text


def console() -> Any:  # rich.console.Console, or a PlainConsole
    if _use_rich():
        from rich.console import Console

        return Console(highlight=False)
    return PlainConsole()


def table(title: str) -> Any:  # rich.table.Table, or a PlainTable
    if _use_rich():
        return _folding_table_class()(title=title)
    return PlainTable(title)


def _folding_table_class() -> Any:
    from rich.table import Table

    class FoldingTable(Table):
        """Long cells (record names, paths) wrap onto more lines instead of being cut with "…"."""

        def add_column(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("overflow", "fold")
            super().add_column(*args, **kwargs)

    return FoldingTable


@contextmanager
def progress(out: Any, total: int) -> Iterator[Callable[[str], None]]:
    """Yields step(description): a progress bar with rich, a line on stderr per step without."""
    if _rich_available() and not isinstance(out, PlainConsole):
        from rich.progress import Progress

        with Progress(console=out, transient=True) as bar:
            task = bar.add_task("", total=total)

            def rich_step(description: str) -> None:
                bar.update(task, description=description)
                bar.advance(task)

            yield rich_step
        return
    done = [0]

    def step(description: str) -> None:
        done[0] += 1
        print(f"[{done[0]}/{total}] {description}", file=sys.stderr, flush=True)

    yield step


class PlainConsole:
    def print(self, obj: object = "") -> None:
        text = obj.render() if isinstance(obj, PlainTable) else _MARKUP.sub("", str(obj))
        print(text, flush=True)


class PlainTable:
    def __init__(self, title: str) -> None:
        self.title = title
        self.columns: list[tuple[str, bool]] = []  # (name, right-justified)
        self.rows: list[list[str]] = []

    def add_column(self, name: str, justify: str = "left") -> None:
        self.columns.append((name, justify == "right"))

    def add_row(self, *cells: object) -> None:
        self.rows.append([_MARKUP.sub("", str(c)) for c in cells])

    def render(self) -> str:
        widths = [max([len(name)] + [len(row[i]) for row in self.rows]) for i, (name, _) in enumerate(self.columns)]

        def line(cells: list[str]) -> str:
            return "  ".join(c.rjust(w) if right else c.ljust(w)
                             for c, w, (_, right) in zip(cells, widths, self.columns)).rstrip()

        return "\n".join([self.title, line([name for name, _ in self.columns])] + [line(r) for r in self.rows])
