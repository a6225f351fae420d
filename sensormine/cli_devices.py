"""`sensormine device rotate-key|revoke|delete|sync-broker`: device keys in the registry and at the MQTT broker."""

from __future__ import annotations

from typing import Annotated

import typer

from sensormine.cli_common import fail
from sensormine.db import connect
from sensormine.dynsec import DynsecError, device_username
from sensormine.registry import (
    BrokerUpdate,
    RegistryError,
    delete_device,
    revoke_device_key,
    rotate_device_key,
    sync_broker,
)

Tenant = Annotated[str, typer.Argument(help="The device's tenant.")]
DeviceId = Annotated[str, typer.Argument(help="The device id.")]


def _broker_line(update: BrokerUpdate, done: str, hint: str) -> None:
    """Say what happened at the broker; exit 1 when the broker could not be updated."""
    if update is BrokerUpdate.APPLIED:
        typer.echo(f"MQTT broker: {done}")
    elif update is BrokerUpdate.SKIPPED:
        typer.echo("MQTT broker: no dynamic security configured, nothing to do there")
    else:
        fail(f"the MQTT broker could not be updated (see the warning above); {hint}")


def rotate_key(tenant_id: Tenant, device_id: DeviceId) -> None:
    """Issue a new device key (shown once); the old key stops working at once, at the broker too."""
    with connect() as conn:
        try:
            key = rotate_device_key(conn, tenant_id, device_id)
        except RegistryError as exc:
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
            update = revoke_device_key(conn, tenant_id, device_id)
        except RegistryError as exc:
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
            update = delete_device(conn, tenant_id, device_id)
        except RegistryError as exc:
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
    with connect() as conn:
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
    device_app.command("rotate-key")(rotate_key)
    device_app.command("revoke")(revoke)
    device_app.command("delete")(delete)
    device_app.command("sync-broker")(sync_broker_command)
