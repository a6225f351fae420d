"""The `sensormine` command line: services, tenants, devices, API keys, daemons, the demo."""

from __future__ import annotations

import typer

from sensormine.db import connect, migrate
from sensormine.kafka import ensure_topics
from sensormine.registry import RegistryError, create_api_key, create_device, create_tenant, list_tenants
from sensormine.settings import get_settings

app = typer.Typer(help="Sensormine industrial-IoT data platform.", no_args_is_help=True)
db_app = typer.Typer(help="The hot-store database.", no_args_is_help=True)
tenant_app = typer.Typer(help="Tenants (and sub-tenants).", no_args_is_help=True)
device_app = typer.Typer(help="Devices of a tenant.", no_args_is_help=True)
apikey_app = typer.Typer(help="API keys of a tenant.", no_args_is_help=True)
ingest_app = typer.Typer(help="Always-on ingest daemons.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(tenant_app, name="tenant")
app.add_typer(device_app, name="device")
app.add_typer(apikey_app, name="apikey")
app.add_typer(ingest_app, name="ingest")


def _services_app() -> typer.Typer:
    from sensormine.services.cli import app as services

    return services


app.add_typer(_services_app(), name="services", help="Start/stop the local PostgreSQL, Mosquitto, Redis, Kafka and S3.")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@db_app.command("migrate")
def db_migrate() -> None:
    """Apply pending migrations."""
    with connect() as conn:
        applied = migrate(conn)
    typer.echo(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")


@tenant_app.command("create")
def tenant_create(
    tenant_id: str,
    name: str = typer.Option(None, help="Display name (defaults to the id)."),
    parent: str = typer.Option(None, help="Parent tenant id, for a sub-tenant."),
    plan: str = typer.Option("free", help="free, pro or enterprise."),
) -> None:
    """Create a tenant and print its first API key (shown once)."""
    with connect() as conn:
        migrate(conn)
        try:
            create_tenant(conn, tenant_id, name, parent, plan)
            key = create_api_key(conn, tenant_id, "initial")
        except RegistryError as exc:
            _fail(str(exc))
    settings = get_settings()
    if settings.kafka_bootstrap:
        # Brokers in production often refuse to auto-create topics: make the tenant's now.
        ensure_topics([settings.telemetry_topic(tenant_id), settings.dlq_topic], settings=settings)
    typer.echo(f"tenant {tenant_id} created" + (f" under {parent}" if parent else ""))
    typer.echo(f"api key (shown once): {key}")


@tenant_app.command("list")
def tenant_list() -> None:
    """List tenants."""
    with connect() as conn:
        for t in list_tenants(conn):
            typer.echo(f"{t.id}\t{t.plan}\t{t.parent_id or '-'}\t{t.name}")


@device_app.command("create")
def device_create(
    tenant_id: str,
    device_id: str,
    name: str = typer.Option(None, help="Display name."),
    device_type: str = typer.Option(None, "--type", help="Device type (selects its schema)."),
) -> None:
    """Register a device and print its device key (shown once)."""
    with connect() as conn:
        try:
            _, key = create_device(conn, tenant_id, device_id, name, device_type)
        except RegistryError as exc:
            _fail(str(exc))
    typer.echo(f"device {device_id} created in {tenant_id}")
    typer.echo(f"device key (shown once): {key}")


@apikey_app.command("create")
def apikey_create(tenant_id: str, name: str = typer.Option("cli", help="What the key is for.")) -> None:
    """Issue an API key (shown once)."""
    with connect() as conn:
        try:
            key = create_api_key(conn, tenant_id, name)
        except RegistryError as exc:
            _fail(str(exc))
    typer.echo(f"api key (shown once): {key}")


@ingest_app.command("mqtt")
def ingest_mqtt() -> None:
    """Run the MQTT ingest daemon."""
    from ingest_daemons.mqtt import main

    main()


@ingest_app.command("consumer")
def ingest_consumer() -> None:
    """Run the Kafka → hot-store consumer."""
    from ingest_daemons.consumer import main

    main()


@app.command("api")
def api(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the REST API with uvicorn."""
    import uvicorn

    uvicorn.run("serving.main:app", factory=True, host=host, port=port)


@app.command("demo")
def demo(
    port: int = typer.Option(8000, help="API port."),
    dagster_port: int = typer.Option(3000, help="Dagster UI port."),
    check: bool = typer.Option(False, help="Exit 0 once a simulated point is served by the API (smoke test)."),
    dagster: bool = typer.Option(True, help="Also run the Dagster UI."),
) -> None:
    """Run the whole platform on its embedded defaults with simulated devices for two tenants."""
    from sensormine.demo import run_demo

    raise typer.Exit(run_demo(api_port=port, dagster_port=dagster_port, check=check, with_dagster=dagster))


if __name__ == "__main__":
    app()
