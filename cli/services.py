"""`sensormine services ...`: typer commands around the launcher (also `python -m cli.services`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sensormine.services import launcher
from sensormine.services.errors import ServiceError

app = typer.Typer(
    help="Start, stop and inspect the local services Sensormine needs "
    "(PostgreSQL, Mosquitto, Redis, Kafka, S3/moto, SMTP/aiosmtpd) on loopback, under a state dir.",
    no_args_is_help=True,
    add_completion=False,
)

StateDir = Annotated[
    Path | None,
    typer.Option("--state-dir", help="State dir (default: $SENSORMINE_STATE_DIR, else ./.sensormine)."),
]
Only = Annotated[
    str | None,
    typer.Option("--only", help=f"Comma-separated subset of: {','.join(launcher.ALL_SERVICES)}."),
]


def _names(only: str | None) -> list[str]:
    return [n for n in only.split(",") if n.strip()] if only else list(launcher.ALL_SERVICES)


def _progress(msg: str) -> None:
    typer.echo(msg, err=True)  # stderr, so stdout stays `eval`-able export lines


@app.command()
def up(
    only: Only = None,
    embedded: Annotated[
        bool,
        typer.Option(
            "--embedded",
            help="Use the pip-wheel PostgreSQL (pgserver) and MQTT broker (amqtt) "
            "instead of Debian's postgresql/mosquitto.",
        ),
    ] = False,
    state_dir: StateDir = None,
) -> None:
    """Start whatever is not running yet and print `export SENSORMINE_...` lines."""
    try:
        env = launcher.up(_names(only), state_dir, progress=_progress, embedded=embedded)
    except ServiceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(launcher.export_lines(env), nl=False)


@app.command()
def down(only: Only = None, state_dir: StateDir = None) -> None:
    """Stop the services this state dir started."""
    try:
        launcher.down(_names(only), state_dir, progress=_progress)
    except ServiceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def status(
    state_dir: StateDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show each service: running/stopped, pid and URL."""
    info = launcher.status(state_dir)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    for name, s in info.items():
        pid = str(s["pid"]) if s["pid"] else "-"
        mode = " (embedded)" if s["running"] and s["mode"] == "embedded" else ""
        typer.echo(f"{name:<10} {s['state']:<8} pid {pid:<8} {s['url'] or '-'}{mode}")


@app.command()
def env(state_dir: StateDir = None) -> None:
    """Print `export SENSORMINE_...` lines for the running services (starts nothing)."""
    settings = launcher.env(state_dir)
    if not settings:
        typer.echo("no services running here; start them with `sensormine services up`", err=True)
        raise typer.Exit(1)
    typer.echo(launcher.export_lines(settings), nl=False)


if __name__ == "__main__":
    app()
