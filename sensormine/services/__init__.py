"""Local service launcher: PostgreSQL, Mosquitto, Redis, Kafka, S3 (moto) and SMTP (aiosmtpd)
on loopback.

Use `sensormine.services.launcher.up/down/status` from Python or `sensormine services ...`
(`python -m cli.services`) from a shell; see docs/services.md.
"""

from sensormine.services.errors import ServiceError
from sensormine.services.launcher import ALL_SERVICES, down, env, status, up

__all__ = ["ALL_SERVICES", "ServiceError", "down", "env", "status", "up"]
