"""Devices of the caller's tenants: registration (single and CSV import), keys, status, connection profiles.

Every change is a use case of `sensormine.devices.usecases` (row-level security, plan checks, the
audit entry, the broker), shared with the `sensormine device` commands; these routes parse, authorise
and shape answers. Device keys are returned once, at registration, import or rotation, and never
again. See docs/device-identity.md ("REST API").
"""

from serving.routes.devices import csv_import, registry, status

# Fixed paths (/status, /import) before /{device_id}: routes match in the order they are added.
routers = (status.router, csv_import.router, registry.router)
