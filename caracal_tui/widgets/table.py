"""A data table that shows one snapshot after another without losing the operator's place."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

from rich.console import RenderableType
from textual.geometry import Size
from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey, RowDoesNotExist, RowKey

Row = tuple[str, tuple[RenderableType, ...]]


class SnapshotTable(DataTable[RenderableType]):
    """Rows are ``(key, cells)``. Showing a new snapshot with the same rows updates only the cells that
    changed; otherwise the table is rebuilt and the cursor stays on the row it was on, if still there."""

    DEFAULT_CSS = """
    SnapshotTable {
        height: 1fr;
    }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self._keys: list[str] = []
        self._cells: list[tuple[RenderableType, ...]] = []
        self._columns: list[str] = []

    def _update_dimensions(self, new_rows: Iterable[RowKey]) -> None:
        """DataTable measures every cell of every new row to size its columns, which makes a table of a
        thousand rows take a second to show. Every column here has a fixed width and every row one line,
        so only the scrollable size needs computing."""
        if any(column.auto_width for column in self.columns.values()):
            super()._update_dimensions(new_rows)
            return
        width = sum(column.get_render_width(self) for column in self.columns.values())
        header = self.header_height if self.show_header else 0
        self.virtual_size = Size(width + self._row_label_column_width, self._total_row_height + header)

    def set_columns(self, columns: Sequence[tuple[str, str, int | None]]) -> None:
        """``(key, label, width)``; a width of None fits the content."""
        self.clear(columns=True)
        self._keys, self._cells, self._columns = [], [], []
        for key, label, width in columns:
            self.add_column(label, key=key, width=width)
            self._columns.append(key)

    @property
    def selected_key(self) -> str | None:
        if not self._keys or self.cursor_row < 0 or self.cursor_row >= len(self._keys):
            return None
        return self._keys[self.cursor_row]

    def show_rows(self, rows: Sequence[Row]) -> None:
        keys = [key for key, _ in rows]
        if keys == self._keys:
            changed = False
            for (key, cells), old in zip(rows, self._cells, strict=True):
                if cells is old or cells == old:
                    continue
                data = self._data[RowKey(key)]
                for column, new, previous in zip(self._columns, cells, old, strict=False):
                    if new != previous:
                        data[ColumnKey(column)] = new
                        changed = True
            if changed:
                # update_cell() repaints once per cell; a refresh changes hundreds: one repaint for all
                self._update_count += 1
                self.refresh()
        else:
            current = self.selected_key
            self.clear()
            for key, cells in rows:
                self.add_row(*cells, key=key)
            if current is not None:
                with contextlib.suppress(RowDoesNotExist):
                    self.move_cursor(row=self.get_row_index(current))
        self._keys = keys
        self._cells = [cells for _, cells in rows]
