"""Reading and checking the YAML documents of the node: settings, model cards, recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dicomnode.errors import DicomNodeError


def describe_validation_error(error: ValidationError, top: str) -> str:
    """``key.path: reason; ...`` for every problem; ``top`` names the document itself."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or top
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def read_yaml_mapping(path: Path, what: str, error: type[DicomNodeError]) -> dict[str, Any]:
    """The mapping at the top of a YAML file; ``error`` (naming ``what`` and the file) otherwise.

    An empty file is an empty mapping.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise error(f"{what} {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{what} {path} must hold a mapping at the top level")
    return data
