"""Routes: audit (being built)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/api/audit", tags=["audit"])
