"""Hashing of high-entropy secrets (device keys, API keys)."""

from __future__ import annotations

import hashlib


def hash_secret(secret: str) -> str:
    """SHA-256 of a high-entropy secret (keys are random, so no slow KDF is needed)."""
    return hashlib.sha256(secret.encode()).hexdigest()
