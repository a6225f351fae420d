"""Running SQL on a `LakeCatalog`: statements one by one, results as a table, CSV or Parquet, and a small shell.

What `sensormine sql` does, kept out of the CLI module so it can be tested and reused:

- `run_script` runs a `-c` string or a `-f` file. Statements run in order and stop at the first
  error. In table format every statement that returns rows is shown; in CSV and Parquet format
  only the last statement's result is written (earlier statements prepare it: SET, CREATE TEMP
  TABLE, ...), so the output is always one well-formed file.
- `run_shell` is the interactive loop: statements end with `;` (and may span lines), plus the
  dot commands `.tables`, `.schema [name]`, `.refresh`, `.help` and `.quit`.

Results stream from DuckDB as Arrow record batches, so CSV and Parquet output of a large result
never holds it whole in memory; table output keeps only the rows it shows.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sqlite3
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, TextIO

import duckdb
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from lake.catalog import LakeCatalog, quote_identifier

OutputFormat = Literal["table", "csv", "parquet"]
FORMATS: tuple[OutputFormat, ...] = ("table", "csv", "parquet")

# Statements whose result is rows to show (DDL and SET report a count or nothing: not shown).
_QUERY_TYPES = {
    duckdb.StatementType.SELECT,
    duckdb.StatementType.PRAGMA,
    duckdb.StatementType.EXPLAIN,
    duckdb.StatementType.CALL,
    duckdb.StatementType.MULTI,  # PIVOT: setup statements, then a SELECT
}
_DML_TYPES = {duckdb.StatementType.INSERT, duckdb.StatementType.UPDATE, duckdb.StatementType.DELETE}
_BATCH_ROWS = 64 * 1024
_EXPLAIN_COLUMNS = ["explain_key", "explain_value"]

SHELL_HELP = """\
SQL statements end with ';' and may span several lines. Dot commands:
  .tables            the lake tables of this session (reader, version, files, rows)
  .schema [NAME]     columns of one table, or of all
  .refresh           re-open the catalog at the tables' latest versions
  .help              this text
  .quit / .exit      leave (Ctrl-D too)"""


class SqlError(Exception):
    """A statement could not be parsed or run; the message is DuckDB's (or Arrow's) own."""


@dataclass
class Result:
    """One statement's outcome: its text and, when it returns rows, a stream of them."""

    sql: str
    rows: pa.RecordBatchReader | None


def _message(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__


def split_statements(conn: duckdb.DuckDBPyConnection, text: str) -> list[duckdb.Statement]:
    """The statements of a script, parsed by DuckDB (so `;` inside strings and comments is handled)."""
    try:
        return list(conn.extract_statements(text))
    except duckdb.Error as exc:
        raise SqlError(_message(exc)) from None


def execute(conn: duckdb.DuckDBPyConnection, statement: duckdb.Statement) -> Result:
    """Run one statement; its rows (if it returns any) stream from the returned reader."""
    try:
        # Queries come back as lazy relations (run once, when read); anything else runs here.
        relation = conn.sql(statement)
        returns_rows = relation is not None and statement.type in _QUERY_TYPES
        if relation is not None and statement.type in _DML_TYPES:
            # A RETURNING clause turns the plain row count into rows worth showing.
            returns_rows = relation.columns != ["Count"]
        rows = relation.to_arrow_reader(_BATCH_ROWS) if relation is not None and returns_rows else None
    except duckdb.Error as exc:
        raise SqlError(_message(exc)) from None
    return Result(statement.query.strip(), rows)


def _batches(reader: pa.RecordBatchReader) -> Iterator[pa.RecordBatch]:
    """The reader's batches, with errors raised while the query runs turned into SqlError."""
    it = iter(reader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (duckdb.Error, pa.ArrowException) as exc:
            raise SqlError(_message(exc)) from None
        yield batch


def _terminal_width(out: IO[Any]) -> int | None:
    isatty = getattr(out, "isatty", None)
    if isatty is not None and isatty():
        return shutil.get_terminal_size((120, 40)).columns
    return None


def write_table(reader: pa.RecordBatchReader, out: TextIO, max_rows: int = 1000) -> int:
    """Render up to `max_rows` rows as a text table on `out`; returns the total row count."""
    head: list[pa.RecordBatch] = []
    shown = total = 0
    for batch in _batches(reader):
        total += batch.num_rows
        if shown < max_rows:
            take = batch.slice(0, max_rows - shown)
            head.append(take)
            shown += take.num_rows
    table = pa.Table.from_batches(head, schema=reader.schema)
    if table.schema.names == _EXPLAIN_COLUMNS:
        # A plan is drawn already: print it as it is rather than as an escaped cell.
        for plan in table.column("explain_value").to_pylist():
            out.write(f"{plan}\n")
        return total
    width = _terminal_width(out)
    renderer = duckdb.connect()
    try:
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            renderer.from_arrow(table).show(
                max_rows=max(shown, 1),
                max_width=width if width is not None else 100_000,
                max_col_width=None if width is not None else 100_000,
                null_value="NULL",
            )
    finally:
        renderer.close()
    out.write(text.getvalue().rstrip() + "\n")
    if total > shown:
        out.write(f"({total} rows, first {shown} shown: --format csv or parquet writes them all)\n")
    else:
        out.write(f"({total} row{'' if total == 1 else 's'})\n")
    return total


def _csv_safe(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The batch with nested columns (lists, structs, maps) as JSON text: CSV has no other way to hold them."""
    if not any(pa.types.is_nested(f.type) for f in batch.schema):
        return batch
    columns = []
    for field, column in zip(batch.schema, batch.columns, strict=True):
        if pa.types.is_nested(field.type):
            texts = [None if v is None else json.dumps(v, default=str) for v in column.to_pylist()]
            column = pa.array(texts, type=pa.string())
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def write_csv(reader: pa.RecordBatchReader, sink: IO[bytes]) -> int:
    """Write every row as CSV (header first) to a binary stream; returns the row count."""
    rows = 0
    header = True
    for batch in _batches(reader):
        if batch.num_rows == 0 and not header:
            continue
        buffer = io.BytesIO()
        try:
            pcsv.write_csv(_csv_safe(batch), buffer, pcsv.WriteOptions(include_header=header))
        except pa.ArrowException as exc:
            raise SqlError(f"cannot write this result as CSV: {_message(exc)}") from None
        sink.write(buffer.getvalue())
        header = False
        rows += batch.num_rows
    if header:  # no batch at all: still a header line
        buffer = io.BytesIO()
        pcsv.write_csv(pa.Table.from_batches([], reader.schema), buffer)
        sink.write(buffer.getvalue())
    sink.flush()
    return rows


def write_parquet(reader: pa.RecordBatchReader, path: Path) -> int:
    """Write every row to a Parquet file (zstd); returns the row count."""
    rows = 0
    with pq.ParquetWriter(path, reader.schema, compression="zstd") as writer:
        for batch in _batches(reader):
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows


class _TextSink(io.RawIOBase):
    """Bytes written to it go to a text stream (for text streams without a binary buffer, like StringIO)."""

    def __init__(self, out: TextIO) -> None:
        super().__init__()
        self._out = out

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._out.write(bytes(data).decode("utf-8"))
        return len(data)


def _binary(out: TextIO) -> IO[bytes]:
    """The binary stream under a text stream (flushed first, so text and bytes stay in order)."""
    out.flush()
    buffer = getattr(out, "buffer", None)
    return buffer if buffer is not None else _TextSink(out)  # type: ignore[return-value]


def emit(result: pa.RecordBatchReader, fmt: OutputFormat, out: TextIO, output: Path | None, max_rows: int) -> int:
    """Write one result in `fmt` to `output` (a file) or `out`; returns the row count."""
    if fmt == "parquet":
        if output is None:
            raise SqlError("--format parquet needs --output PATH")
        return write_parquet(result, output)
    if output is None:
        if fmt == "csv":
            return write_csv(result, _binary(out))
        return write_table(result, out, max_rows)
    if fmt == "csv":
        with output.open("wb") as f:
            return write_csv(result, f)
    with output.open("w", encoding="utf-8") as f:
        return write_table(result, f, max_rows)


def run_script(
    catalog: LakeCatalog,
    text: str,
    fmt: OutputFormat = "table",
    out: TextIO | None = None,
    output: Path | None = None,
    max_rows: int = 1000,
) -> int:
    """Run a script's statements in order; returns the rows written. Raises SqlError at the first failure."""
    out = out or sys.stdout
    statements = split_statements(catalog.conn, text)
    if not statements:
        raise SqlError("no SQL statement given")
    if fmt == "parquet" and output is None:
        raise SqlError("--format parquet needs --output PATH")
    if fmt == "table" and output is None:
        written = 0
        for statement in statements:
            result = execute(catalog.conn, statement)
            if result.rows is not None:
                written += write_table(result.rows, out, max_rows)
        return written
    # One file: the last statement's result.
    for statement in statements[:-1]:
        execute(catalog.conn, statement)
    last = execute(catalog.conn, statements[-1])
    if last.rows is None:
        raise SqlError(f"the last statement returns no rows to write: {last.sql[:80]}")
    return emit(last.rows, fmt, out, output, max_rows)


def tables_listing(catalog: LakeCatalog) -> pa.Table:
    """The `.tables` listing: one row per view."""
    views = list(catalog.views.values())
    return pa.table(
        {
            "table": [v.name for v in views],
            "reader": [v.reader for v in views],
            "version": pa.array([v.version for v in views], pa.int64()),
            "files": pa.array([v.files for v in views], pa.int64()),
            "rows": pa.array([v.rows for v in views], pa.int64()),
            "partitioned_by": [", ".join(v.partition_columns) for v in views],
        }
    )


def describe_scope(catalog: LakeCatalog) -> str:
    """One line saying which lake and which tenants a session sees."""
    scope = "all tenants" if catalog.tenant_ids is None else "tenants " + (", ".join(catalog.tenant_ids) or "(none)")
    names = ", ".join(catalog.views) or "no tables yet"
    return f"lake {catalog.lake_root} ({scope}): {names}"


def _is_tty(stream: IO[Any]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def run_shell(
    open_catalog: Callable[[], LakeCatalog],
    fmt: OutputFormat = "table",
    stdin: TextIO | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    max_rows: int = 1000,
) -> int:
    """The interactive loop; returns the exit code (1 when input was piped and a statement failed)."""
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    err = err or sys.stderr
    if fmt == "parquet":
        raise SqlError("the shell writes tables or CSV; use -c or -f with --format parquet")
    interactive = _is_tty(stdin)
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    catalog = open_catalog()
    if interactive:
        err.write(describe_scope(catalog) + "\n" + 'Statements end with ";". ".help" for help, ".quit" to leave.\n')
    failed = False
    buffer = ""

    def read_line(prompt: str) -> str:
        if interactive and stdin is sys.stdin:
            return input(prompt)
        line = stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def report(message: str) -> None:
        nonlocal failed
        failed = True
        err.write(f"error: {message}\n")
        err.flush()

    try:
        while True:
            try:
                line = read_line("sql> " if not buffer else "  -> ")
            except EOFError:
                break
            except KeyboardInterrupt:
                out.write("\n")
                buffer = ""
                continue
            if not buffer and line.strip().startswith("."):
                command, _, argument = line.strip().partition(" ")
                if command in (".quit", ".exit"):
                    break
                if command == ".refresh":
                    try:
                        fresh = open_catalog()
                    except Exception as exc:
                        report(f"refresh failed, keeping the previous catalog: {_message(exc)}")
                        continue
                    catalog.close()
                    catalog = fresh
                    err.write(describe_scope(catalog) + "\n")
                    continue
                try:
                    _dot_command(catalog, command, argument.strip(), out, max_rows)
                except SqlError as exc:
                    report(str(exc))
                continue
            buffer += line + "\n"
            if not sqlite3.complete_statement(buffer):
                continue
            text, buffer = buffer, ""
            try:
                _run_interactive(catalog, text, fmt, out, max_rows)
            except SqlError as exc:
                report(str(exc))
            except KeyboardInterrupt:
                report("interrupted")
        if buffer.strip():
            try:
                _run_interactive(catalog, buffer, fmt, out, max_rows)
            except SqlError as exc:
                report(str(exc))
    finally:
        catalog.close()
    out.flush()
    return 1 if failed and not interactive else 0


def _run_interactive(catalog: LakeCatalog, text: str, fmt: OutputFormat, out: TextIO, max_rows: int) -> None:
    for statement in split_statements(catalog.conn, text):
        result = execute(catalog.conn, statement)
        if result.rows is not None:
            emit(result.rows, fmt, out, None, max_rows)
        out.flush()


def _dot_command(catalog: LakeCatalog, command: str, argument: str, out: TextIO, max_rows: int) -> None:
    if command == ".help":
        out.write(SHELL_HELP + "\n")
    elif command == ".tables":
        write_table(_reader(tables_listing(catalog)), out, max_rows)
    elif command == ".schema":
        names = [argument] if argument else list(catalog.views)
        for name in names:
            try:
                described = catalog.sql(f"DESCRIBE {quote_identifier(name)}")
            except duckdb.Error as exc:
                raise SqlError(_message(exc)) from None
            out.write(f"{name}\n")
            write_table(_reader(described), out, max_rows)
    else:
        raise SqlError(f"unknown command {command} (.help lists them)")


def _reader(table: pa.Table) -> pa.RecordBatchReader:
    return pa.RecordBatchReader.from_batches(table.schema, table.to_batches())
