"""The `sensormine` command line: services, tenants, devices, API keys, daemons, the demo."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import psycopg
import typer

from cli.billing import app as billing_app
from cli.common import fail
from cli.devices import register as register_device_commands
from cli.dlq import app as dlq_app
from cli.lake import app as lake_app
from cli.services import app as services_app
from cli.users import app as users_app
from sensormine.billing.usecases import sign_up_tenant
from sensormine.clients.postgres import AUTH, DatabaseNotConfigured, connect, migrate_database, role_scope
from sensormine.identity.credentials import operator_identity
from sensormine.identity.roles import AuthError, Role
from sensormine.identity.usecases import DEFAULT_KEY_SCOPES, issue_api_key
from sensormine.settings import get_settings
from sensormine.tenancy.tenants import RegistryError, list_tenants

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


app.add_typer(lake_app, name="lake")
register_device_commands(device_app)
app.add_typer(dlq_app, name="dlq")
app.add_typer(users_app, name="user")
app.add_typer(billing_app, name="billing")
app.add_typer(services_app, name="services", help="Start/stop the local servers: PostgreSQL, Kafka, stripe-mock, ...")


@db_app.command("bootstrap")
def db_bootstrap(
    admin_url: str = typer.Option(
        ..., envvar="SENSORMINE_DATABASE_ADMIN_URL", help="A superuser's URL of the platform's database."
    ),
    passwords: Path = typer.Option(
        ...,
        exists=True,
        dir_okay=False,
        help="JSON object: login role -> password, for sensormine_owner, sensormine_api, sensormine_ingestd, "
        "sensormine_dagster and sensormine_app.",
    ),
) -> None:
    """Create the run-time roles once per cluster (as a superuser), before the first `db migrate`.

    `sensormine services up` does this itself; use it for a server you run. Afterwards give each process
    its own login: the API sensormine_api, the ingest daemons and consumer sensormine_ingestd, Dagster
    sensormine_dagster; migrations run as sensormine_owner (SENSORMINE_DATABASE_MIGRATE_URL).
    """
    import json

    from sensormine.services.postgres import LOGINS, bootstrap_roles

    given = json.loads(passwords.read_text())
    missing = sorted(set(LOGINS) - set(given))
    if missing:
        fail(f"{passwords} has no password for {', '.join(missing)}")
    database = admin_url.rsplit("/", 1)[1].split("?", 1)[0]
    try:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            bootstrap_roles(conn, given, database)
    except psycopg.Error as exc:
        fail(f"bootstrap failed: {exc}")
    typer.echo(f"roles ready in {database}: {', '.join(sorted(LOGINS))}; now run `sensormine db migrate`")


@db_app.command("migrate")
def db_migrate() -> None:
    """Apply pending migrations."""
    applied = migrate_database()
    typer.echo(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")


@tenant_app.command("create")
def tenant_create(
    tenant_id: str,
    name: str = typer.Option(None, help="Display name (defaults to the id)."),
    parent: str = typer.Option(None, help="Parent tenant id, for a sub-tenant."),
    plan: str | None = typer.Option(
        None, help="free, pro or enterprise; omitted: free for a top-level tenant, inherited for a sub-tenant."
    ),
) -> None:
    """Create a tenant (and its Kafka topics) and print its first API key (shown once)."""
    settings = get_settings()
    migrate_database()
    with connect() as conn:
        operator = operator_identity(conn)
        try:
            sign_up_tenant(conn, operator, settings, tenant_id, name, parent, plan)
            # A fresh identity: the operator's tenants now include the new one.
            key = issue_api_key(conn, operator_identity(conn), tenant_id, "initial")
        except RegistryError as exc:
            fail(str(exc))
    typer.echo(f"tenant {tenant_id} created" + (f" under {parent}" if parent else ""))
    typer.echo(f"api key (shown once): {key.secret}")


@tenant_app.command("list")
def tenant_list() -> None:
    """List tenants."""
    with connect() as conn, operator_identity(conn).scope(conn):
        for t in list_tenants(conn):
            typer.echo(f"{t.id}\t{t.plan or '(inherited)'}\t{t.parent_id or '-'}\t{t.name}")


@apikey_app.command("create")
def apikey_create(
    tenant_id: str,
    name: str = typer.Option("cli", help="What the key is for."),
    role: Role = typer.Option(Role.OPERATOR.value, help="The key's role: tenant_admin, operator, viewer or device."),
    scope: list[str] = typer.Option(
        list(DEFAULT_KEY_SCOPES),
        "--scope",
        help="Narrow the role's permissions (repeat): read, write, or a permission.",
    ),
) -> None:
    """Issue an API key (shown once)."""
    with connect() as conn:
        try:
            key = issue_api_key(conn, operator_identity(conn), tenant_id, name, role, scope)
        except (RegistryError, AuthError) as exc:
            fail(str(exc))
    typer.echo(f"api key (shown once): {key.secret}")


@ingest_app.command("mqtt")
def ingest_mqtt() -> None:
    """Run the MQTT ingest daemon."""
    from ingest_daemons.mqtt import main

    main()


@ingest_app.command("opcua")
def ingest_opcua(
    profile_poll: float = typer.Option(5.0, help="Seconds between reads of the device profiles."),
    backoff_max: float = typer.Option(60.0, help="Longest wait between reconnects, in seconds."),
) -> None:
    """Run the OPC UA ingest daemon (subscribes to every device with an opcua profile)."""
    from ingest_daemons.opcua import main

    main(["--profile-poll", str(profile_poll), "--backoff-max", str(backoff_max)])


@ingest_app.command("modbus")
def ingest_modbus() -> None:
    """Run the Modbus TCP ingest daemon (polls every device with a modbus profile)."""
    from ingest_daemons.modbus import main

    main()


@ingest_app.command("consumer")
def ingest_consumer() -> None:
    """Run the Kafka → hot-store consumer."""
    from ingest_daemons.consumer import main

    main()


@ingest_app.command("metering")
def ingest_metering() -> None:
    """Run the metering consumer: usage events from Kafka {env}.metering.events into the usage ledger."""
    from ingest_daemons.metering import main

    main()


@ingest_app.command("alerts")
def ingest_alerts() -> None:
    """Run the stream processor: alarm rules on the Kafka telemetry topics (its own consumer group)."""
    from ingest_daemons.streamproc import main

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
    check: bool = typer.Option(
        False, help="Exit 0 once simulated points are served by the API and a knock raised an alarm (smoke test)."
    ),
    dagster: bool = typer.Option(True, help="Also run the Dagster UI."),
) -> None:
    """Run the whole platform on its embedded defaults with simulated devices for two tenants."""
    from cli.demo import run_demo

    raise typer.Exit(run_demo(api_port=port, dagster_port=dagster_port, check=check, with_dagster=dagster))


@app.command("sql")
def sql(
    command: str = typer.Option(None, "--command", "-c", help="SQL to run (several statements separated by ';')."),
    file: Path = typer.Option(None, "--file", "-f", help="A file of SQL statements to run.", dir_okay=False),
    tenant: str = typer.Option(None, "--tenant", help="Only this tenant's rows, and its sub-tenants'."),
    output_format: str = typer.Option("table", "--format", help="table, csv or parquet."),
    output: Path = typer.Option(None, "--output", "-o", help="Write the result to this file (needed for parquet)."),
    max_rows: int = typer.Option(1000, "--max-rows", help="Rows shown in table format."),
) -> None:
    """SQL over the lake with DuckDB: every lake table is a view (shell without -c/-f)."""
    import duckdb
    from deltalake.exceptions import DeltaError

    from lake.catalog import LakeCatalog, open_catalog
    from lake.sqlshell import FORMATS, OutputFormat, SqlError, run_script, run_shell
    from lake.storage import LakeError
    from sensormine.tenancy.tenants import visible_tenant_ids

    if output_format not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)}, not {output_format!r}")
    fmt = cast(OutputFormat, output_format)
    if command is not None and file is not None:
        fail("give either -c or -f, not both")
    if fmt == "parquet" and output is None:
        fail("--format parquet needs --output PATH")
    tenant_ids: list[str] | None = None
    if tenant is not None:
        try:
            with connect() as conn, role_scope(conn, AUTH):
                tenant_ids = visible_tenant_ids(conn, tenant)
        except (psycopg.Error, DatabaseNotConfigured) as exc:
            fail(f"cannot resolve tenant {tenant!r}: {exc}")
        if not tenant_ids:
            fail(f"tenant {tenant!r} does not exist")
    settings = get_settings()
    failures = (SqlError, LakeError, DeltaError, duckdb.Error, OSError)

    def catalog() -> LakeCatalog:
        return open_catalog(settings, tenant_ids)

    try:
        if command is None and file is None:
            if fmt == "parquet":
                fail("the shell writes tables or CSV: use -c or -f with --format parquet")
            raise typer.Exit(run_shell(catalog, fmt, max_rows=max_rows))
        text = command if command is not None else file.read_text(encoding="utf-8")
        with catalog() as session:
            run_script(session, text, fmt, output=output, max_rows=max_rows)
    except failures as exc:
        fail(str(exc).strip() or type(exc).__name__)


if __name__ == "__main__":
    app()
