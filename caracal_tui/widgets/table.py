"""A data table that shows one snapshot after another without losing the operator's place.

A refresh of a thousand rows must cost little more than drawing the few dozen on screen, and DataTable spends
most of a redraw on work that does not change between refreshes: Rich laying out each cell's text, and CSS
styles looked up again for every line. So, with the same result on screen:

* rows may come as :class:`LazyCells`, made only when drawn (or read);
* a cell's layout is kept per content and width, and its styled line per position and content;
* the styles a redraw looks up once per line are looked up once per redraw.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from itertools import zip_longest
from typing import Any, NamedTuple

from rich.cells import cell_len
from rich.console import RenderableType
from rich.padding import Padding
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.coordinate import Coordinate
from textual.geometry import Size
from textual.strip import Strip
from textual.widgets import DataTable
from textual.widgets._data_table import RowRenderables, default_cell_formatter  # what DataTable draws with
from textual.widgets.data_table import ColumnKey, DuplicateKey, RowDoesNotExist, RowKey
from textual.widgets.data_table import Row as DataTableRow

Cells = tuple[RenderableType, ...]


class LazyCells:
    """A row's cells, made from ``data`` by ``make`` when first needed.

    The table compares rows by identity: pass the same object again for a row that has not changed."""

    __slots__ = ("_cells", "_keys", "_make", "_shown", "data")

    def __init__(self, data: Any, make: Callable[[Any], Cells]) -> None:
        self.data = data
        self._make = make
        self._cells: Cells | None = None
        self._shown: list[RenderableType] | None = None
        self._keys: tuple[tuple[object, ...] | None, ...] | None = None

    @property
    def cells(self) -> Cells:
        if self._cells is None:
            self._cells = self._make(self.data)
        return self._cells

    def shown(self) -> list[RenderableType]:
        """The cells as a one-line row of the table shows them (strings parsed as DataTable does)."""
        if self._shown is None:
            self._shown = [_one_line(cell) for cell in self.cells]
        return self._shown

    def keys(self) -> tuple[tuple[object, ...] | None, ...]:
        """What each shown cell's layout depends on (see ``_content_key``)."""
        if self._keys is None:
            self._keys = tuple(_content_key(cell) for cell in self.shown())
        return self._keys


def _one_line(cell: RenderableType) -> RenderableType:
    """``default_cell_formatter(cell, wrap=False, height=1)``, without parsing a string that has no markup,
    emoji code or line break (what DataTable would make of it is then plain text)."""
    if type(cell) is str and not any(mark in cell for mark in "[:\n\r"):
        return Text(cell, end="", no_wrap=True)
    return default_cell_formatter(cell, wrap=False, height=1)


class _Slot:
    """Where a lazy row's current cells are: a refresh that changes the row replaces them here, and the
    table's own data (cells that point at the slot) stays as it is."""

    __slots__ = ("row",)

    def __init__(self, row: LazyCells) -> None:
        self.row = row


class _LazyCell:
    """One cell of a lazy row, as the table's data holds it."""

    __slots__ = ("index", "slot")

    def __init__(self, slot: _Slot, index: int) -> None:
        self.slot = slot
        self.index = index

    def __rich__(self) -> RenderableType:
        return self.slot.row.shown()[self.index]


Row = tuple[str, Cells | LazyCells]


class _Recent:
    """A cache that keeps what was used in its last two generations of ``size`` entries: bounded, and it
    never drops what is on screen all at once."""

    __slots__ = ("_current", "_previous", "_size")

    def __init__(self, size: int) -> None:
        self._size = size
        self._current: dict[tuple[object, ...], Any] = {}
        self._previous: dict[tuple[object, ...], Any] = {}

    def get(self, key: tuple[object, ...]) -> Any:
        found = self._current.get(key)
        if found is None:
            found = self._previous.get(key)
            if found is not None:
                self.put(key, found)
        return found

    def put(self, key: tuple[object, ...], value: Any) -> None:
        if len(self._current) >= self._size:
            self._previous, self._current = self._current, {}
        self._current[key] = value

    def clear(self) -> None:
        self._current, self._previous = {}, {}


_NULL = Style.null()


class _Settings(NamedTuple):
    """The table's settings a redraw reads for every cell (reactive attributes are slow to read)."""

    plain: bool  # no fixed rows or columns, no row labels, a row cursor: the cases drawn here
    show_cursor: bool
    show_hover: bool
    padding: int
    css_foreground: bool
    css_background: bool
    widths: tuple[int, ...]  # each column's, padding included
    width: int  # the widget's
    simple: bool  # the console lays text out as written (no justification of its own): see _simple_line


def _content_key(cell: RenderableType) -> tuple[object, ...] | None:
    """What a text cell's layout depends on (None: another renderable, laid out every time)."""
    if type(cell) is not Text:
        return None
    return (
        cell.plain,
        cell.style,
        tuple(cell.spans),
        cell.justify,
        cell.overflow,
        cell.no_wrap,
        cell.end,
        cell.tab_size,
    )


def _simple_line(
    cell: Text, width: int, padding: int, get_style: Callable[..., Style]
) -> list[Segment] | None:
    """Rich's layout of a one-line text cell in ``width`` columns with ``padding`` on each side, built
    directly for the common case (no spans, nothing to cut, wrap or tab); None for any other cell."""
    plain = cell.plain
    if cell.spans or cell.justify not in (None, "default") or cell.no_wrap is False:
        return None
    if "\n" in plain or "\t" in plain:
        return None
    inner = width - 2 * padding
    length = cell_len(plain)
    if length > inner or padding < 1 or inner < 1:
        return None
    if cell.style:
        if not plain:
            return None
        text = Segment(plain, get_style(cell.style, default=_NULL))
    else:
        text = Segment(plain)
    line = [Segment(" " * padding, _NULL), text]
    if length < inner:
        line.append(Segment(" " * (inner - length), _NULL))
    line.append(Segment(" " * padding, _NULL))
    return line


class SnapshotTable(DataTable[RenderableType]):
    """Rows are ``(key, cells)``, the cells a tuple or :class:`LazyCells`. Showing a new snapshot with the
    same rows updates only the cells that changed; otherwise the table is rebuilt and the cursor stays on the
    row it was on, if still there."""

    DEFAULT_CSS = """
    SnapshotTable {
        height: 1fr;
    }
    """

    def __init__(self, *, id: str | None = None) -> None:
        # DataTable's set-up already clears caches: these exist before it runs
        # a screenful is a few dozen lines of a few hundred cells: each cache keeps a few screenfuls
        #: (cell content, width, padding) -> its padded line before any style is applied.
        self._laid_out = _Recent(2048)
        #: (position, row style, highlight, content, width) -> the cell's styled line.
        self._styled = _Recent(2048)
        #: (position, row style, highlight, the row's cells) -> the line's cells, styled.
        self._lines = _Recent(256)
        #: Styles that depend on the CSS only, looked up once per redraw (None between redraws).
        self._paint: dict[object, Any] | None = None
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self._keys: list[str] = []
        self._cells: list[Cells | LazyCells] = []
        self._columns: list[str] = []
        self._slots: dict[RowKey, _Slot] = {}
        self._row_slots: list[_Slot | None] = []  # the same, in the order of the rows
        self._offsets: tuple[object, int, list[tuple[RowKey, int]]] | None = None
        #: The last snapshot shown has not been drawn on screen yet (timings wait for it).
        self.unpainted = False
        self._after_paint: list[Callable[[], object]] = []

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

    @property
    def _y_offsets(self) -> list[tuple[RowKey, int]]:
        """DataTable's, which it makes again (a thousand entries) after every update of any cell: the lines
        only move when rows are added, removed or reordered, and each of those replaces or grows the map of
        row places this is kept with. (Every row here is one line high.)"""
        places, count = self._row_locations, len(self.rows)
        found = self._offsets
        if found is not None and found[0] is places and found[1] == count:
            return found[2]
        offsets: list[tuple[RowKey, int]] = super()._y_offsets
        self._offsets = (places, count, offsets)
        return offsets

    def set_columns(self, columns: Sequence[tuple[str, str, int | None]]) -> None:
        """``(key, label, width)``; a width of None fits the content."""
        self.clear(columns=True)
        self._columns = []
        for key, label, width in columns:
            self.add_column(label, key=key, width=width)
            self._columns.append(key)

    @property
    def selected_key(self) -> str | None:
        if not self._keys or self.cursor_row < 0 or self.cursor_row >= len(self._keys):
            return None
        return self._keys[self.cursor_row]

    def clear(self, columns: bool = False) -> SnapshotTable:
        super().clear(columns)
        self._keys, self._cells, self._slots, self._row_slots = [], [], {}, []
        return self

    def show_rows(self, rows: Sequence[Row]) -> None:
        keys = [key for key, _ in rows]
        if keys == self._keys:
            changed = reshaped = False
            for (key, cells), old, known in zip(rows, self._cells, self._row_slots, strict=True):
                if cells is old:
                    continue
                if known is not None and isinstance(cells, LazyCells):
                    known.row = cells  # the table's cells for the row read it from there
                    changed = True
                    continue
                row_key = RowKey(key)
                slot = self._slots.get(row_key)
                if isinstance(cells, LazyCells):
                    if slot is not None:
                        slot.row = cells
                    else:
                        lazy = self._lazy_row(row_key, cells)
                        self._data[row_key].update(zip(self._column_keys(), lazy, strict=True))
                        reshaped = True
                    changed = True
                elif slot is not None or isinstance(old, LazyCells):
                    self._slots.pop(row_key, None)
                    self._data[row_key].update(zip(self._column_keys(), cells, strict=False))
                    changed = reshaped = True
                elif cells != old:
                    data = self._data[row_key]
                    for column, value, previous in zip(self._column_keys(), cells, old, strict=False):
                        if value != previous:
                            data[column] = value
                            changed = True
            if changed:
                # update_cell() repaints once per cell; a refresh changes hundreds: one repaint for all
                self._update_count += 1
                self.refresh()
                self.unpainted = True
            if reshaped:
                self._row_slots = [self._slots.get(RowKey(key)) for key in keys]
        else:
            current = self.selected_key
            self.clear()
            self._add_rows(
                (key, self._lazy_row(RowKey(key), cells) if isinstance(cells, LazyCells) else cells)
                for key, cells in rows
            )
            if current is not None:
                with contextlib.suppress(RowDoesNotExist):
                    self.move_cursor(row=self.get_row_index(current))
            self.unpainted = True
            self._row_slots = [self._slots.get(RowKey(key)) for key in keys]
        self._keys = keys
        self._cells = [cells for _, cells in rows]

    def _add_rows(self, rows: Iterable[tuple[str, Sequence[RenderableType]]]) -> None:
        """``add_row(*cells, key=key)`` for each row, with DataTable's per-row upkeep (the cursor checked
        again, a new cache generation) done once for all, not a thousand times."""
        columns = self._column_keys()
        for key, cells in rows:
            if not self.rows:  # the first row also brings the cursor (and its event)
                self.add_row(*cells, key=key)
                continue
            row_key = RowKey(key)
            if row_key in self._row_locations:
                raise DuplicateKey(f"The row key {row_key!r} already exists.")
            if len(cells) > len(columns):
                raise ValueError("More values provided than there are columns.")
            self._row_locations[row_key] = len(self.rows)
            self._data[row_key] = dict(zip_longest(columns, cells))
            self.rows[row_key] = DataTableRow(row_key, 1)
            self._new_rows.add(row_key)
        self._require_update_dimensions = True
        self.cursor_coordinate = self.cursor_coordinate
        self._update_count += 1
        self.check_idle()

    def _lazy_row(self, key: RowKey, cells: LazyCells) -> list[_LazyCell]:
        slot = self._slots[key] = _Slot(cells)
        return [_LazyCell(slot, index) for index in range(len(self._columns))]

    def _column_keys(self) -> list[ColumnKey]:
        return [column.key for column in self.ordered_columns]

    # ------------------------------------------------------------------ drawing

    def _clear_caches(self) -> None:
        super()._clear_caches()
        self._clear_own_caches()

    def notify_style_update(self) -> None:
        self._clear_own_caches()
        super().notify_style_update()

    def _clear_own_caches(self) -> None:
        self._laid_out.clear()
        self._styled.clear()
        self._lines.clear()

    def render_lines(self, crop: Any) -> list[Strip]:
        self._paint = {}
        try:
            return super().render_lines(crop)
        finally:
            self._paint = None
            self.unpainted = False
            callbacks, self._after_paint = self._after_paint, []
            for callback in callbacks:
                self.call_later(callback)  # once the frame this is part of is done

    def after_paint(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` once the table's lines have next been drawn."""
        self._after_paint.append(callback)

    def _painting(self, key: object, compute: Callable[[], Any]) -> Any:
        """``compute()``, once per redraw."""
        if self._paint is None:
            return compute()
        found = self._paint.get(key)
        if found is None:
            found = self._paint[key] = compute()
        return found

    def _settings(self) -> _Settings:
        return self._painting(  # type: ignore[no-any-return]
            "settings",
            lambda: _Settings(
                not (self.fixed_rows or self.fixed_columns or self._should_render_row_labels)
                and self.cursor_type == "row",
                self.show_cursor,
                self._show_hover_cursor,
                self.cell_padding,
                self.cursor_foreground_priority == "css",
                self.cursor_background_priority == "css",
                tuple(column.get_render_width(self) for column in self.ordered_columns),
                self.size.width,
                self.app.console_options.justify in (None, "default"),
            ),
        )

    def render_line(self, y: int) -> Strip:
        # DataTable's own, with the widget's style looked up once per redraw rather than once per line
        if self.fixed_rows:
            return super().render_line(y)
        width, _height = self.size
        scroll_x, scroll_y = self.scroll_offset
        fixed_rows_height = self.get_row_height(self._header_row_key) if self.show_header else 0
        if y >= fixed_rows_height:
            y += scroll_y
        base_style = self._painting("rich_style", lambda: self.rich_style)
        return self._render_line(y, scroll_x, scroll_x + width, base_style)

    def _get_row_style(self, row_index: int, base_style: Style) -> Style:
        if row_index == -1 or row_index < self.fixed_rows or not self.zebra_stripes:
            return super()._get_row_style(row_index, base_style)
        return self._painting(  # type: ignore[no-any-return]
            ("row style", row_index % 2, base_style),
            lambda: super(SnapshotTable, self)._get_row_style(row_index, base_style),
        )

    def _compute_row_renderables(self, row_index: int) -> RowRenderables:
        key = self._row_locations.get_key(row_index) if row_index >= 0 else None
        slot = self._slots.get(key) if key is not None else None
        if slot is not None and not self._should_render_row_labels:
            shown = slot.row.shown()
            if len(shown) == len(self.columns):
                return RowRenderables(None, shown)
        return super()._compute_row_renderables(row_index)

    def _render_line_in_row(
        self,
        row_key: RowKey,
        line_no: int,
        base_style: Style,
        cursor_location: Coordinate,
        hover_location: Coordinate,
    ) -> tuple[list[list[Segment]], list[list[Segment]]]:
        """DataTable's own for a data row of a table like this one (a row cursor, no row labels or fixed
        columns), without the per-line look-ups of styles that only the other kinds of table use."""
        found_index = self._row_locations.get(row_key)
        row_index = -1 if found_index is None else found_index
        settings = self._settings()
        if row_index < 0 or not settings.plain or line_no or self.rows[row_key].height != 1:
            return super()._render_line_in_row(row_key, line_no, base_style, cursor_location, hover_location)
        slot = self._slots.get(row_key)
        if slot is not None:
            cells = slot.row.shown()
            contents = slot.row.keys()
            identity: object = slot.row  # the same object again: the same cells
        else:
            cells = self._get_row_renderables(row_index).cells
            contents = tuple(_content_key(cell) for cell in cells)
            identity = contents
        if len(cells) != len(settings.widths) or None in contents:
            return super()._render_line_in_row(row_key, line_no, base_style, cursor_location, hover_location)
        row_style = self._get_row_style(row_index, base_style)
        # a row cursor highlights (or hovers) every cell of its row, or none
        cursor = row_index == cursor_location.row
        hover = row_index == hover_location.row
        line_key = (
            row_index,
            row_style,
            cursor,
            hover,
            settings,
            self._pseudo_class_state,
            self._row_label_column_width,
            identity,
        )
        found = self._lines.get(line_key)
        if found is not None:
            return found  # type: ignore[no-any-return]
        scrollable_row = []
        for column_index, (width, cell, content) in enumerate(
            zip(settings.widths, cells, contents, strict=True)
        ):
            assert isinstance(cell, Text)  # (a text cell is what has a content key)
            assert content is not None
            line = self._cell_line(
                row_index, column_index, row_style, width, cursor, hover, settings, cell, content
            )
            if line is None:
                line = super()._render_cell(row_index, column_index, row_style, width, cursor, hover)[0]
            scrollable_row.append(line)
        remaining_space = max(0, settings.width - sum(settings.widths) - self._row_label_column_width)
        extend_style, _ = self._get_styles_to_render_cell(
            False,
            False,
            False,
            hover,  # (the hover at the row's first column)
            cursor,
            settings.show_cursor,
            settings.show_hover,
            False,
            False,
        )
        extend_style = row_style + extend_style
        extend_style += Style.from_meta({"row": row_index, "column": 0, "out_of_bounds": True})
        scrollable_row.append([Segment(" " * remaining_space, extend_style)])
        row_pair: tuple[list[list[Segment]], list[list[Segment]]] = ([], scrollable_row)
        self._lines.put(line_key, row_pair)
        return row_pair

    def _cell_line(
        self,
        row_index: int,
        column_index: int,
        row_style: Style,
        width: int,
        cursor: bool,
        hover: bool,
        settings: _Settings,
        cell: Text,
        content: tuple[object, ...],
    ) -> list[Segment] | None:
        """DataTable's ``_render_cell`` for a one-line text cell (None: not one this can draw), kept per
        position and content instead of per refresh (a refresh changes every cell's DataTable cache key,
        but few cells' content), with the layout kept per content and width (names, states and bars repeat
        down a column).

        DataTable renders ``Styled(Padding(cell), pre, post)``; styling the padded line afterwards gives the
        same segments."""
        styled_key = (
            row_index,
            column_index,
            row_style,
            cursor,
            hover,
            settings,
            self._pseudo_class_state,
            content,
        )
        found = self._styled.get(styled_key)
        if found is not None:
            return found  # type: ignore[no-any-return]
        padding = settings.padding
        laid_key = (width, padding, content)
        line = self._laid_out.get(laid_key)
        if line is None:
            console = self.app.console
            line = _simple_line(cell, width, padding, console.get_style) if settings.simple else None
            if line is None:
                options = self.app.console_options.update_dimensions(width, 1).update(no_wrap=True)
                line = console.render_lines(Padding(cell, (0, padding)), options)[0]
            if Segment.get_line_length(line) != width:  # not the exact width styling afterwards assumes
                return None
            self._laid_out.put(laid_key, line)
        component_style, post_style = self._get_styles_to_render_cell(
            False,
            False,
            False,
            hover,
            cursor,
            settings.show_cursor,
            settings.show_hover,
            settings.css_foreground,
            settings.css_background,
        )
        pre_style = row_style + Style.from_meta({"row": row_index, "column": column_index}) + component_style
        styled = list(Segment.apply_style(line, pre_style, post_style))
        self._styled.put(styled_key, styled)
        return styled
