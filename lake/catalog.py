"""SQL over the lake: a DuckDB session in which every Delta table under the lake root is a view.

`open_catalog(settings)` discovers the Delta tables directly under `settings.lake_root`
(`telemetry`, `telemetry_1m`, `telemetry_1h`, ... whatever exists) and registers each as a view of
the same name, pinned to the table's version at the time the catalog opens.

Two ways to read a table's files, chosen per table (docs/sql.md):

- **duckdb**: the view is DuckDB's own `read_parquet` over the exact list of Parquet files in the
  Delta snapshot (partition columns from the hive-style paths, checked against the log). DuckDB
  prunes partitions by path, skips row groups by statistics and reads in parallel: this is as fast
  as querying the Parquet files by hand. Used for a local lake, where DuckDB can open the files
  itself.
- **pyarrow**: the snapshot as a pyarrow dataset (`DeltaTable.to_pyarrow_dataset`) on a pyarrow
  filesystem built from `Settings`, registered in DuckDB, which pushes column selections and
  filters into the scan. Used for an S3 lake (DuckDB's httpfs extension cannot be installed here)
  and wherever the first route cannot be proven right (paths that do not encode the partitions,
  newer Delta reader features).

A catalog restricted to tenants (`tenant_ids=[...]`) only ever reaches their rows: each table is
pruned to the tenants' partitions, every view filters on `tenant_id`, tables without a
`tenant_id` column are not registered, and the DuckDB session is locked down (no file access
beyond the tenants' own Parquet files, no extensions, no ATTACH, configuration locked), so a
query cannot go around the views. Every session runs in UTC.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from deltalake import DeltaTable

from lake.storage import LakeError, check_tenant_id, open_table, table_uri
from sensormine.settings import Settings

Reader = Literal["duckdb", "pyarrow"]
ReaderChoice = Literal["auto", "duckdb", "pyarrow"]

TENANT_COLUMN = "tenant_id"
# DuckDB types for the partition column types the duckdb route can parse from paths.
_HIVE_TYPES: dict[pa.DataType, str] = {
    pa.string(): "VARCHAR",
    pa.large_string(): "VARCHAR",
    pa.date32(): "DATE",
    pa.int8(): "TINYINT",
    pa.int16(): "SMALLINT",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.bool_(): "BOOLEAN",
}
# Delta reader features that leave a table's Parquet files readable as they are.
_PLAIN_READER_FEATURES = {"timestampNtz"}
# A partition value DuckDB reads back from a path exactly as delta-rs wrote it (no escaping).
_PLAIN_PATH_VALUE = re.compile(r"^[A-Za-z0-9_.:+\- ]+$")


@dataclass(frozen=True)
class LakeView:
    """One lake table as the session sees it."""

    name: str
    uri: str
    version: int
    files: int
    rows: int | None
    reader: Reader
    partition_columns: tuple[str, ...]
    columns: tuple[str, ...]


class LakeCatalog:
    """A DuckDB connection with the lake's tables as views, plus what was registered."""

    def __init__(
        self,
        conn: duckdb.DuckDBPyConnection,
        views: Sequence[LakeView],
        tenant_ids: tuple[str, ...] | None,
        lake_root: str,
    ) -> None:
        self.conn = conn
        self.views: dict[str, LakeView] = {v.name: v for v in views}
        self.tenant_ids = tenant_ids
        self.lake_root = lake_root

    @property
    def restricted(self) -> bool:
        """True when the session only sees some tenants' rows."""
        return self.tenant_ids is not None

    def sql(self, query: str) -> pa.Table:
        """Run one query and return its whole result as an Arrow table."""
        relation = self.conn.sql(query)
        if relation is None:
            raise LakeError(f"statement returns no rows: {query[:80]}")
        return relation.to_arrow_table()

    def close(self) -> None:
        """Close the DuckDB connection."""
        self.conn.close()

    def __enter__(self) -> LakeCatalog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def quote_identifier(name: str) -> str:
    """A DuckDB identifier in double quotes (any name is safe in it)."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """A DuckDB string literal."""
    return "'" + value.replace("'", "''") + "'"


def _is_local(root: str) -> bool:
    return "://" not in root or root.startswith("file://")


def _local_path(root: str) -> str:
    return os.path.abspath(root.removeprefix("file://"))


def s3_filesystem(settings: Settings) -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem configured from the same options delta-rs gets (`Settings.storage_options`)."""
    opts = {k.upper(): v for k, v in settings.storage_options().items()}
    kwargs: dict[str, Any] = {"region": opts.get("AWS_REGION", settings.s3_region)}
    if endpoint := opts.get("AWS_ENDPOINT_URL"):
        parts = urlsplit(endpoint)
        if parts.scheme:
            kwargs["scheme"] = parts.scheme
            kwargs["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
        else:
            kwargs["scheme"] = "http" if opts.get("AWS_ALLOW_HTTP", "").lower() == "true" else "https"
            kwargs["endpoint_override"] = endpoint
    if "AWS_ACCESS_KEY_ID" in opts:
        kwargs["access_key"] = opts["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = opts.get("AWS_SECRET_ACCESS_KEY", "")
        if "AWS_SESSION_TOKEN" in opts:
            kwargs["session_token"] = opts["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)


def lake_filesystem(settings: Settings) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem reaching the lake, and the lake root's path inside it."""
    root = settings.lake_root
    if root.startswith("s3://"):
        return s3_filesystem(settings), root.removeprefix("s3://").rstrip("/")
    if _is_local(root):
        return pafs.LocalFileSystem(), _local_path(root)
    raise LakeError(f"unsupported lake URI {root!r}: use a local folder or s3://bucket/prefix")


def lake_tables(settings: Settings) -> list[str]:
    """Names of the Delta tables directly under the lake root, sorted (none when the lake is empty)."""
    fs, base = lake_filesystem(settings)
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=False))
    names = sorted(
        info.base_name
        for info in infos
        if info.type == pafs.FileType.Directory and not info.base_name.startswith(("_", "."))
    )
    return [name for name in names if DeltaTable.is_deltatable(table_uri(settings, name), settings.storage_options())]


@dataclass(frozen=True)
class SnapshotFiles:
    """The data files of a Delta snapshot a session reads, from the log's add actions, as plain Python values.

    Plain lists rather than Arrow arrays on purpose: building Arrow arrays from Python objects
    makes pyarrow import pandas, a second of start-up that `sensormine sql -c` should not pay.
    """

    paths: list[str]
    partition_values: dict[str, list[Any]]
    records: list[int | None]
    columns_with_stats: frozenset[str]  # data columns the log has statistics for in every file

    @classmethod
    def from_actions(
        cls, actions: pa.Table, partition_columns: Sequence[str], tenant_ids: Sequence[str] | None = None
    ) -> SnapshotFiles:
        """The files listed in `actions` (`get_add_actions(flatten=True)`).

        Only the tenants' files when `tenant_ids` is given and the table is partitioned by tenant.
        """
        paths = actions.column("path").to_pylist()
        keep = list(range(len(paths)))
        if tenant_ids is not None and TENANT_COLUMN in partition_columns:
            wanted = set(tenant_ids)
            tenants = actions.column(f"partition.{TENANT_COLUMN}").to_pylist()
            keep = [i for i in keep if tenants[i] in wanted]
        columns: dict[str, list[Any]] = {}
        for c in partition_columns:
            values = actions.column(f"partition.{c}").to_pylist()
            columns[c] = [values[i] for i in keep]
        records = (
            actions.column("num_records").to_pylist() if "num_records" in actions.column_names else [None] * len(paths)
        )
        with_stats = frozenset(
            name.removeprefix("null_count.")
            for name in actions.column_names
            if name.startswith("null_count.") and actions.column(name).null_count == 0
        )
        return cls([paths[i] for i in keep], columns, [records[i] for i in keep], with_stats)

    @property
    def rows(self) -> int | None:
        """Rows in these files, when the log records every file's count."""
        if any(r is None for r in self.records):
            return None
        return sum(r for r in self.records if r is not None)


def _add_actions(table: DeltaTable) -> pa.Table:
    # Through the Arrow C stream rather than pa.table(), whose pandas check imports pandas.
    return pa.RecordBatchReader.from_stream(table.get_add_actions(flatten=True)).read_all()


def _empty(schema: pa.Schema) -> pa.Table:
    return pa.Table.from_batches([], schema)  # schema.empty_table() would import pandas


def _plain_parquet(table: DeltaTable) -> bool:
    """True when the table's Parquet files hold its rows as they are (no deletion vectors, column mapping...)."""
    protocol = table.protocol()
    if protocol.min_reader_version <= 1:
        return True
    features = set(protocol.reader_features or ())
    return protocol.min_reader_version >= 3 and features <= _PLAIN_READER_FEATURES


def paths_encode_partitions(files: SnapshotFiles, partition_columns: Sequence[str]) -> bool:
    """True when every file path is `<col>=<value>/.../<file>` with exactly the log's partition values."""
    for i, path in enumerate(files.paths):
        if path.startswith("/") or "://" in path:
            return False
        dirs = path.split("/")[:-1]
        if len(dirs) != len(partition_columns):
            return False
        for segment, column in zip(dirs, partition_columns, strict=True):
            value = files.partition_values[column][i]
            if value is None:
                return False
            text = value.isoformat() if hasattr(value, "isoformat") else str(value)
            if not _PLAIN_PATH_VALUE.match(text) or segment != f"{column}={text}":
                return False
    return True


def _tenant_filter_sql(tenant_ids: Sequence[str]) -> str:
    if not tenant_ids:
        return "false"
    return f"{quote_identifier(TENANT_COLUMN)} IN ({', '.join(quote_literal(t) for t in tenant_ids)})"


def _register_duckdb_view(
    conn: duckdb.DuckDBPyConnection,
    name: str,
    root: str,
    schema: pa.Schema,
    partition_columns: Sequence[str],
    snapshot: SnapshotFiles,
    tenant_ids: Sequence[str] | None,
) -> list[str]:
    """Create the view over DuckDB's read_parquet of the snapshot's files; returns the files."""
    files = [f"{root}/{path}" for path in snapshot.paths]
    if not files:
        conn.register(name, _empty(schema))
        return files
    options = []
    if partition_columns:
        types = ", ".join(
            f"{quote_literal(c)}: {quote_literal(_HIVE_TYPES[schema.field(c).type])}" for c in partition_columns
        )
        options += ["hive_partitioning = true", f"hive_types = {{{types}}}"]
    else:
        options.append("hive_partitioning = false")
    data_columns = {c for c in schema.names if c not in partition_columns}
    if not data_columns <= snapshot.columns_with_stats:
        # Some file may predate a column (schema evolution): match columns by name, NULL where absent.
        options.append("union_by_name = true")
    file_list = "[" + ", ".join(quote_literal(f) for f in files) + "]"
    columns = ", ".join(quote_identifier(c) for c in schema.names)
    where = "" if tenant_ids is None else f" WHERE {_tenant_filter_sql(tenant_ids)}"
    conn.execute(
        f"CREATE VIEW {quote_identifier(name)} AS SELECT {columns} "
        f"FROM read_parquet({file_list}, {', '.join(options)}){where}"
    )
    return files


def _register_pyarrow_view(
    conn: duckdb.DuckDBPyConnection,
    settings: Settings,
    name: str,
    table: DeltaTable,
    schema: pa.Schema,
    partition_columns: Sequence[str],
    tenant_ids: Sequence[str] | None,
) -> int:
    """Register the snapshot as a pyarrow dataset (pruned and filtered to the tenants); returns its file count."""
    if tenant_ids is not None and not tenant_ids:
        conn.register(name, _empty(schema))
        return 0
    fs, base = lake_filesystem(settings)
    pruning = None
    if tenant_ids is not None and TENANT_COLUMN in partition_columns:
        pruning = [(TENANT_COLUMN, "in", list(tenant_ids))]
    dataset = table.to_pyarrow_dataset(
        filesystem=pafs.SubTreeFileSystem(f"{base}/{name}", fs), file_pruning_predicate=pruning
    )
    files = len(dataset.files)
    if tenant_ids is not None:
        # Part of the registered object itself: whatever SQL scans it, only these tenants' rows come out.
        dataset = dataset.filter(pc.field(TENANT_COLUMN).isin(pa.array(list(tenant_ids), type=pa.string())))
    conn.register(name, dataset)
    return files


def _choose_reader(
    choice: ReaderChoice,
    settings: Settings,
    table: DeltaTable,
    schema: pa.Schema,
    partition_columns: Sequence[str],
    snapshot: SnapshotFiles,
    tenant_ids: Sequence[str] | None,
) -> Reader:
    duckdb_ok = (
        _is_local(settings.lake_root)
        and _plain_parquet(table)
        and all(schema.field(c).type in _HIVE_TYPES for c in partition_columns)
        # A restricted session may open the files it reads: they must hold only its tenants' rows.
        and (tenant_ids is None or TENANT_COLUMN in partition_columns)
        and paths_encode_partitions(snapshot, partition_columns)
    )
    if choice == "duckdb" and not duckdb_ok:
        raise LakeError(f"table {table.table_uri} cannot be read by DuckDB's Parquet reader directly")
    if choice == "pyarrow" or not duckdb_ok:
        return "pyarrow"
    return "duckdb"


def _register_table(
    conn: duckdb.DuckDBPyConnection,
    settings: Settings,
    name: str,
    tenant_ids: Sequence[str] | None,
    reader: ReaderChoice,
) -> tuple[LakeView, list[str]] | None:
    """Register one table; returns its view and the files DuckDB itself opens (None when not registered)."""
    table = open_table(settings, name)
    if table is None:  # dropped since discovery
        return None
    schema = pa.schema(table.schema().to_arrow())
    if tenant_ids is not None and TENANT_COLUMN not in schema.names:
        return None  # not tenant data: a tenant's session does not see it
    partition_columns = tuple(table.metadata().partition_columns)
    snapshot = SnapshotFiles.from_actions(_add_actions(table), partition_columns, tenant_ids)
    chosen = _choose_reader(reader, settings, table, schema, partition_columns, snapshot, tenant_ids)
    opened: list[str] = []
    if chosen == "duckdb":
        root = _local_path(table_uri(settings, name))
        opened = _register_duckdb_view(conn, name, root, schema, partition_columns, snapshot, tenant_ids)
        n_files = len(opened)
    else:
        n_files = _register_pyarrow_view(conn, settings, name, table, schema, partition_columns, tenant_ids)
    # Known exactly unless a restricted session filters a table that is not partitioned by tenant.
    exact = tenant_ids is None or TENANT_COLUMN in partition_columns
    view = LakeView(
        name=name,
        uri=table_uri(settings, name),
        version=table.version(),
        files=n_files,
        rows=snapshot.rows if exact else None,
        reader=chosen,
        partition_columns=partition_columns,
        columns=tuple(schema.names),
    )
    return view, opened


def open_catalog(
    settings: Settings, tenant_ids: Iterable[str] | None = None, *, reader: ReaderChoice = "auto"
) -> LakeCatalog:
    """A DuckDB session over the lake: one view per Delta table, optionally restricted to tenants.

    `tenant_ids=None` sees every row; a list (the caller resolves a tenant to itself and its
    sub-tenants) sees only those tenants' rows, and an empty list sees none. `reader` forces
    how tables are read ("auto" picks per table, see the module docstring).
    """
    tenants = None if tenant_ids is None else tuple(sorted({check_tenant_id(t) for t in tenant_ids}))
    conn = duckdb.connect(":memory:", config={"python_enable_replacements": False})
    try:
        conn.execute("SET TimeZone = 'UTC'")
        views: list[LakeView] = []
        allowed_files: list[str] = []
        for name in lake_tables(settings):
            registered = _register_table(conn, settings, name, tenants, reader)
            if registered is not None:
                views.append(registered[0])
                allowed_files += registered[1]
        if tenants is not None:
            # From here on the session reads nothing but the views: files of other tenants,
            # other paths, extensions and databases are out of reach, and this cannot be undone.
            conn.execute(f"SET allowed_paths = [{', '.join(quote_literal(f) for f in allowed_files)}]")
            conn.execute("SET enable_external_access = false")
            conn.execute("SET lock_configuration = true")
    except BaseException:
        conn.close()
        raise
    return LakeCatalog(conn, views, tenants, settings.lake_root)
