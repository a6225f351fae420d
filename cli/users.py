"""`sensormine user create|list|disable|password`: people who log in, managed on the server.

The first platform administrator can only be made here (the API needs one to log in with):
`sensormine user create --email admin@example.com --role platform_admin`.
"""

from __future__ import annotations

from typing import Annotated

import psycopg
import typer

from cli.common import fail
from sensormine.clients.postgres import connect, migrate_database
from sensormine.identity.credentials import operator_identity
from sensormine.identity.roles import Role
from sensormine.identity.usecases import add_user, change_user
from sensormine.identity.users import MIN_PASSWORD_LENGTH, AuthError, every_user, user_by_email

app = typer.Typer(
    help="Users who log in to the API (the first platform administrator starts here).", no_args_is_help=True
)

PASSWORD_ENV = "SENSORMINE_USER_PASSWORD"
Password = Annotated[
    str | None,
    typer.Option(
        "--password",
        envvar=PASSWORD_ENV,
        show_envvar=True,
        help=f"At least {MIN_PASSWORD_LENGTH} characters; prompted for when neither this nor ${PASSWORD_ENV} is set.",
    ),
]


def _password(given: str | None) -> str:
    if given:
        return given
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


@app.command("create")
def create(
    email: Annotated[str, typer.Option("--email", help="Login name.")],
    role: Annotated[Role, typer.Option("--role", help="The user's role.")] = Role.VIEWER,
    tenant: Annotated[str | None, typer.Option("--tenant", help="The user's tenant (none for platform_admin).")] = None,
    name: Annotated[str, typer.Option("--name", help="Display name (defaults to the email's local part).")] = "",
    password: Password = None,
) -> None:
    """Create a user (a platform_admin has no --tenant; every other role needs one)."""
    if role == Role.PLATFORM_ADMIN and tenant:
        fail("platform administrators belong to no tenant: leave --tenant out")
    if role != Role.PLATFORM_ADMIN and not tenant:
        fail(f"a {role} needs --tenant")
    secret = _password(password)
    migrate_database()
    with connect() as conn:
        try:
            user = add_user(conn, operator_identity(conn), tenant, email, secret, role, name)
        except AuthError as exc:
            fail(str(exc))
    typer.echo(f"user {user.email} ({user.role}) created with id {user.id}" + (f" in {tenant}" if tenant else ""))
    typer.echo("log in: POST /api/auth/token with form fields username=<email> and password")


@app.command("list")
def list_users(
    tenant: Annotated[str | None, typer.Option("--tenant", help="Only this tenant's users.")] = None,
    platform: Annotated[bool, typer.Option("--platform", help="Only platform administrators.")] = False,
) -> None:
    """List users: id, email, role, tenant, and whether disabled."""
    with connect() as conn, operator_identity(conn).scope(conn):
        users = every_user(conn, tenant, platform_only=platform)
    for u in users:
        typer.echo(f"{u.id}\t{u.email}\t{u.role}\t{u.tenant_id or '-'}" + ("\tdisabled" if u.disabled else ""))


def _user_id(conn: psycopg.Connection, email: str) -> str:
    with operator_identity(conn).scope(conn):
        user = user_by_email(conn, email)
    if user is None:
        fail(f"no user with email {email!r}")
    return user.id


@app.command("disable")
def disable(
    email: Annotated[str, typer.Argument(help="The user's email.")],
    enable: Annotated[bool, typer.Option("--enable", help="Enable the user again instead.")] = False,
) -> None:
    """Disable a user (their tokens stop working, they cannot log in), or enable them again."""
    with connect() as conn:
        try:
            change_user(conn, operator_identity(conn), _user_id(conn, email), disabled=not enable)
        except AuthError as exc:
            fail(str(exc))
    typer.echo(f"user {email} {'enabled' if enable else 'disabled'}")


@app.command("password")
def set_password(email: Annotated[str, typer.Argument(help="The user's email.")], password: Password = None) -> None:
    """Set a user's password (their sessions end)."""
    secret = _password(password)
    with connect() as conn:
        try:
            change_user(conn, operator_identity(conn), _user_id(conn, email), password=secret)
        except AuthError as exc:
            fail(str(exc))
    typer.echo(f"password of {email} changed; their sessions ended")
