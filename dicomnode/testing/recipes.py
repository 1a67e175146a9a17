"""The tiny-smoke training recipe (``config/training/tiny-smoke.yaml``) pointed at a folder,
for tests that train: a few seconds a run on tiny data (:mod:`dicomnode.training.tiny`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

SMOKE_RECIPE = Path(__file__).resolve().parents[2] / "config" / "training" / "tiny-smoke.yaml"


def smoke_recipe(recipe: Path, data: Path, out: Path, **overrides: Any) -> Path:
    """Write the smoke recipe on ``data`` to ``recipe`` and return it: its model in
    ``out/model``, checkpoints in ``out/checkpoints``, pixel cache in ``out/cache``;
    ``overrides`` replace any key."""
    raw = yaml.safe_load(SMOKE_RECIPE.read_text(encoding="utf-8"))
    raw.update(
        data_dir=str(data),
        output_dir=str(out / "model"),
        checkpoint_dir=str(out / "checkpoints"),
        cache_dir=str(out / "cache"),
    )
    raw.update(overrides)
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return recipe
