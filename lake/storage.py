"""Where lake tables live and how delta-rs reaches them (local folder or s3://)."""

from __future__ import annotations

from deltalake import DeltaTable

from sensormine.settings import Settings


def table_uri(settings: Settings, name: str) -> str:
    """URI of the lake table `name` under the configured lake root."""
    return f"{settings.lake_root}/{name}"


def open_table(settings: Settings, name: str) -> DeltaTable | None:
    """The lake table `name` at its latest version, or None when it has not been created yet."""
    uri = table_uri(settings, name)
    opts = settings.storage_options()
    if not DeltaTable.is_deltatable(uri, storage_options=opts):
        return None
    return DeltaTable(uri, storage_options=opts)
