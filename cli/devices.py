"""`sensormine device create|import|rotate-key|revoke|delete|sync-broker`: devices in the registry and at the broker.

Each command calls the same use case as its API route (`sensormine.devices.usecases`), acting as the
operator: the same checks, the same audit entries (actor `cli`), the same broker provisioning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import fail
from sensormine.clients.dynsec import Dynsec, DynsecError, device_username
from sensormine.clients.mqtt import telemetry_topic
from sensormine.clients.postgres import connect
from sensormine.devices import usecases
from sensormine.devices.csv_import import parse_device_csv
from sensormine.devices.registry import BrokerUpdate, RegistryError, UnknownDevice, sync_broker
from sensormine.identity.credentials import operator_identity
from sensormine.limits.devices import QuotaExceeded

Tenant = Annotated[str, typer.Argument(help="The device's tenant.")]
DeviceId = Annotated[str, typer.Argument(help="The device id.")]
BeyondQuota = Annotated[
    bool,
    typer.Option(
        "--beyond-quota",
        help="Register even when the tenant's plan has no device left (recorded as beyond_quota in the audit log).",
    ),
]


def _broker_line(update: BrokerUpdate, done: str, hint: str) -> None:
    """Say what happened at the broker; exit 1 when the broker could not be updated."""
    if update is BrokerUpdate.APPLIED:
        typer.echo(f"MQTT broker: {done}")
    elif update is BrokerUpdate.SKIPPED:
        typer.echo("MQTT broker: no dynamic security configured, nothing to do there")
    else:
        fail(f"the MQTT broker could not be updated (see the warning above); {hint}")


def _quota_hint(exc: QuotaExceeded) -> str:
    return f"{exc}\n(an operator may add --beyond-quota; it is recorded in the audit log)"


def create(
    tenant_id: Tenant,
    device_id: DeviceId,
    name: Annotated[str | None, typer.Option(help="Display name.")] = None,
    device_type: Annotated[str | None, typer.Option("--type", help="Device type (selects its schema).")] = None,
    beyond_quota: BeyondQuota = False,
) -> None:
    """Register a device and print its device key (shown once)."""
    with connect() as conn:
        try:
            done = usecases.register_device(
                conn, operator_identity(conn), tenant_id, device_id, name, device_type, beyond_quota=beyond_quota
            )
        except QuotaExceeded as exc:
            fail(_quota_hint(exc))
        except RegistryError as exc:
            fail(str(exc))
    typer.echo(f"device {device_id} created in {tenant_id}")
    typer.echo(f"device key (shown once): {done.key}")
    typer.echo(
        f"MQTT user: {tenant_id}/{device_id} (password: the device key), topic {telemetry_topic(tenant_id, device_id)}"
    )
    if done.broker is BrokerUpdate.FAILED:
        fail(
            "the MQTT broker could not be updated (see the warning above); the key works over HTTP only until "
            f"`sensormine device rotate-key {tenant_id} {device_id}`"
        )


def import_file(
    tenant_id: Tenant,
    path: Annotated[Path, typer.Argument(help="CSV file: header id[,name][,device_type][,metadata].", exists=True)],
    all_or_nothing: Annotated[
        bool, typer.Option("--all-or-nothing", help="Register nothing if any row is rejected.")
    ] = False,
    beyond_quota: BeyondQuota = False,
) -> None:
    """Register devices from a CSV file; prints each row's verdict and the keys issued (shown once)."""
    mode: usecases.ImportMode = "all_or_nothing" if all_or_nothing else "per_row"
    with connect() as conn:
        try:
            rows = parse_device_csv(path.read_bytes())
            done = usecases.import_devices(
                conn, operator_identity(conn), tenant_id, rows, mode, beyond_quota=beyond_quota
            )
        except usecases.ImportRefused as exc:
            for row in exc.rows:
                if row.error:
                    typer.echo(f"line {row.line}: {row.device_id}: rejected: {row.error}", err=True)
            fail(str(exc))
        except QuotaExceeded as exc:
            fail(_quota_hint(exc))
        except RegistryError as exc:
            fail(str(exc))
    for row in done.rows:
        if row.error:
            typer.echo(f"line {row.line}: {row.device_id}: rejected: {row.error}")
        else:
            state = done.broker.get(row.device_id, BrokerUpdate.SKIPPED).value
            key = done.keys[row.device_id]
            typer.echo(f"line {row.line}: {row.device_id}: registered, key (shown once) {key}, broker {state}")
    typer.echo(f"{len(done.keys)} of {len(done.rows)} rows registered in {tenant_id}")


def rotate_key(tenant_id: Tenant, device_id: DeviceId) -> None:
    """Issue a new device key (shown once); the old key stops working at once, at the broker too."""
    with connect() as conn:
        try:
            key = usecases.rotate_key(conn, operator_identity(conn), tenant_id, device_id, Dynsec())
        except UnknownDevice as exc:
            fail(str(exc))
        except DynsecError as exc:
            fail(f"{exc}\nthe key was not changed (the broker must take it at once); try again once the broker is up")
    typer.echo(f"device {device_id} of {tenant_id}: new key issued, the old one is refused from now on")
    typer.echo(f"device key (shown once): {key}")
    typer.echo(f"MQTT user: {device_username(tenant_id, device_id)} (password: the device key)")


def revoke(tenant_id: Tenant, device_id: DeviceId) -> None:
    """Revoke a device's key (HTTP and MQTT) until `rotate-key` issues a new one; the device stays registered."""
    with connect() as conn:
        try:
            update = usecases.revoke_key(conn, operator_identity(conn), tenant_id, device_id)
        except UnknownDevice as exc:
            fail(str(exc))
    typer.echo(f"device {device_id} of {tenant_id}: key revoked")
    _broker_line(update, "client disabled, its connections dropped", "run `sensormine device sync-broker` later")


def delete(
    tenant_id: Tenant,
    device_id: DeviceId,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a device (with its profile and status) from the registry and the MQTT broker."""
    if not yes:
        typer.confirm(f"delete device {device_id} of {tenant_id}?", abort=True)
    with connect() as conn:
        try:
            update = usecases.remove_device(conn, operator_identity(conn), tenant_id, device_id)
        except UnknownDevice as exc:
            fail(str(exc))
    typer.echo(f"device {device_id} of {tenant_id} deleted")
    _broker_line(update, "client and role deleted", "run `sensormine device sync-broker --prune` later")


def sync_broker_command(
    rotate_missing: Annotated[
        bool,
        typer.Option(
            "--rotate-missing", help="Issue new keys (shown once) to devices the broker does not know at all."
        ),
    ] = False,
    prune: Annotated[
        bool, typer.Option("--prune", help="Delete device clients at the broker whose device is not registered.")
    ] = False,
) -> None:
    """Make the MQTT broker's device clients, roles and ACLs match the registry."""
    with connect() as conn, operator_identity(conn).scope(conn, write=True):
        try:
            report = sync_broker(conn, rotate_missing=rotate_missing, prune=prune)
        except DynsecError as exc:
            fail(str(exc))
    if report.skipped:
        typer.echo("MQTT broker: no dynamic security configured (SENSORMINE_MQTT_ADMIN_USERNAME unset); nothing to do")
        return
    typer.echo(f"{report.checked} registered device(s) compared with the broker")
    for label, users in (
        ("repaired (role, ACL or enabled state)", report.repaired),
        ("disabled (key revoked)", report.disabled),
        ("pruned (not registered)", report.pruned),
    ):
        for user in users:
            typer.echo(f"{label}: {user}")
    for user, key in report.rotated.items():
        typer.echo(f"new device key for {user} (shown once): {key}")
    if report.missing:
        for user in report.missing:
            typer.echo(f"unknown to the broker: {user}")
        fail(
            f"{len(report.missing)} device(s) are unknown to the broker and their keys are stored hashed only: "
            "give them new keys with `sensormine device sync-broker --rotate-missing` "
            "(or `sensormine device rotate-key TENANT DEVICE`)"
        )


def register(device_app: typer.Typer) -> None:
    """Add these commands to the `sensormine device` group."""
    device_app.command("create")(create)
    device_app.command("import")(import_file)
    device_app.command("rotate-key")(rotate_key)
    device_app.command("revoke")(revoke)
    device_app.command("delete")(delete)
    device_app.command("sync-broker")(sync_broker_command)
