"""Where lake tables live and how delta-rs reaches them (local folder or s3://)."""

from __future__ import annotations

from deltalake import DeltaTable

from sensormine.settings import Settings


def table_uri(settings: Settings, name: str) -> str:
    """URI of the lake table `name` under the configured lake root."""
    return f"{settings.lake_root}/{name}"


def storage_options(settings: Settings) -> dict[str, str]:
    """delta-rs storage options for the lake: the platform's S3 options plus conditional put on S3."""
    opts = settings.storage_options()
    if settings.lake_root.startswith("s3://"):
        # With an ETag conditional put, two writers cannot both create the same _delta_log entry,
        # so concurrent Dagster runs compacting different tenant-days stay safe on object storage.
        opts.setdefault("aws_conditional_put", "etag")
    return opts


def open_table(settings: Settings, name: str) -> DeltaTable | None:
    """The lake table `name` at its latest version, or None when it has not been created yet."""
    uri = table_uri(settings, name)
    opts = storage_options(settings)
    if not DeltaTable.is_deltatable(uri, storage_options=opts):
        return None
    return DeltaTable(uri, storage_options=opts)
