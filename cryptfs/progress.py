"""Progress lines on stderr for the commands that move or check data (put, get, decrypt,
fsck, umount): drawn with rich on a terminal; nothing off a terminal or with -q."""

import sys

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


def shown(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


class Bar:
    """One line: a label, a bar of bytes done out of `total` (a spinner when the total is not
    known), the rate and time left. `advance(n)`, `update(done, total, label)`, `close()`."""

    def __init__(self, label: str, total: int | None, quiet: bool = False):
        self._progress: Progress | None = None
        if not shown(quiet):
            return
        columns: list[ProgressColumn] = [
            SpinnerColumn() if total is None else BarColumn(),
            TextColumn("{task.description}"),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
        ]
        if total is not None:
            columns.append(TimeRemainingColumn())
        self._progress = Progress(*columns, console=Console(file=sys.stderr), transient=False)
        self._task = self._progress.add_task(_fit(label), total=total)
        self._progress.start()

    def advance(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def update(self, done: int, total: int | None = None, label: str | None = None) -> None:
        if self._progress is not None:
            self._progress.update(
                self._task, completed=done, total=total, description=_fit(label) if label is not None else None
            )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _fit(label: str, width: int = 40) -> str:
    """The end of a long label (the file's name is what tells files apart)."""
    return escape(label if len(label) <= width else "…" + label[-(width - 1) :])


def human(n: float) -> str:
    """A byte count for people: 1.5 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
