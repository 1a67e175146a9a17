"""Readable messages for pydantic validation errors (settings, model cards, recipes)."""

from __future__ import annotations

from pydantic import ValidationError


def describe_validation_error(error: ValidationError, top: str) -> str:
    """``key.path: reason; ...`` for every problem; ``top`` names the document itself."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or top
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        parts.append(f"{where}: {message}")
    return "; ".join(parts)
