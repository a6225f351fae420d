"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter

from serving.deps import ConnDep
from serving.problems import Problem

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(conn: ConnDep) -> dict[str, str]:
    """The hot store answers."""
    try:
        conn.execute("SELECT 1")
    except Exception as exc:  # readiness reports, it does not crash
        raise Problem(503, f"database not reachable: {exc.__class__.__name__}") from None
    return {"status": "ready"}
