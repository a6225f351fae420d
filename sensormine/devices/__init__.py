"""Devices: the registry (ids, keys, broker provisioning), CSV import, connection profiles and status."""
