"""Small widgets of the console: the connection banner and a table that updates in place."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from rich.cells import cell_len
from rich.text import Text
from textual.binding import Binding, BindingType
from textual.coordinate import Coordinate
from textual.widgets import DataTable, Static

Cell = str | Text


class ConnectionBanner(Static):
    """One line under the header: hidden while connected, red while the orchestrator is away."""

    DEFAULT_CSS = """
    ConnectionBanner {
        height: auto;
        padding: 0 1;
        background: $warning-muted;
        color: $text;
        display: none;
    }
    ConnectionBanner.-down {
        background: $error;
        color: $text;
        text-style: bold;
    }
    ConnectionBanner.-shown {
        display: block;
    }
    """

    def connecting(self, server: str) -> None:
        self.update(f"connecting to the orchestrator at {server}…")
        self.set_class(False, "-down")
        self.add_class("-shown")

    def down(self, server: str, reason: str, retry_in: float) -> None:
        self.update(
            f"✖ orchestrator at {server} unreachable ({reason}); retrying in {retry_in:.0f} s, r to retry now"
        )
        self.add_class("-down", "-shown")

    def connected(self) -> None:
        self.remove_class("-down", "-shown")


class LiveTable(DataTable):
    """A row-cursor table refreshed from data: rows are replaced in place when the keys are the
    same and nothing got wider, rebuilt otherwise, and the cursor stays on the same key.

    Column widths are measured here, not left to DataTable: it measures new cells when idle,
    and a row rendered before that keeps its too-narrow rendering in DataTable's cache."""

    DEFAULT_CSS = """
    LiveTable {
        height: 1fr;
    }
    """

    def __init__(self, columns: Sequence[str], *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self._column_labels = list(columns)
        self._widths = [cell_len(label) for label in self._column_labels]

    def on_mount(self) -> None:
        self._add_columns()

    def _add_columns(self) -> None:
        for label, width in zip(self._column_labels, self._widths, strict=True):
            self.add_column(label, key=label, width=width)

    @property
    def current_key(self) -> str | None:
        if not self.row_count or not self.is_valid_row_index(self.cursor_row):
            return None
        return self.coordinate_to_cell_key(Coordinate(self.cursor_row, 0)).row_key.value

    def show_rows(self, rows: Mapping[str, Sequence[Cell]], *, follow_top: bool = False) -> None:
        """Show ``rows`` (key -> cells, in order); with ``follow_top`` a cursor on the first row
        stays on the first row (a newest-first feed), otherwise it stays on its key."""
        widths = [cell_len(label) for label in self._column_labels]
        for cells in rows.values():
            widths = [
                max(w, c.cell_len if isinstance(c, Text) else cell_len(c))
                for w, c in zip(widths, cells, strict=True)
            ]
        keys = [str(k.value) for k in self.rows]
        if keys == list(rows) and all(new <= old for new, old in zip(widths, self._widths, strict=True)):
            for key, cells in rows.items():
                old = self.get_row(key)
                for label, value, previous in zip(self._column_labels, cells, old, strict=True):
                    if value != previous:
                        self.update_cell(key, label, value)
            return
        current = None if follow_top and self.cursor_row == 0 else self.current_key
        self._widths = widths
        self.clear(columns=True)
        self._add_columns()
        for key, cells in rows.items():
            self.add_row(*cells, key=key)
        if current is not None and current in rows:
            self.move_cursor(row=list(rows).index(current), animate=False)


class OpenableTable(LiveTable):
    """A LiveTable whose enter key opens the highlighted row (and says so in the footer)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter", "select_cursor", "Open")]
