"""Named DIMSE status codes returned by the node (PS3.4 Annex B and PS3.7 Annex C)."""

from __future__ import annotations

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
"""Refused: out of resources (free space below storage.min_free_mb, database unavailable)."""
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
"""Error: cannot understand (unparseable dataset)."""
MISSING_UID = 0xC001
"""Error: cannot understand, a required UID is missing or invalid (dicomnode-specific C0xx code)."""
PROCESSING_FAILURE = 0x0110
