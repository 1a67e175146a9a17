"""The commands' help as an administrator reads it in a terminal."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from dicomnode.cli import app


def _help(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return re.sub(r"[ │]+", " ", result.output)


@pytest.mark.parametrize(
    ("command", "sentence"),
    [
        ("predict", "so that a script sees it; images that the node's routing skips"),
        ("study", "where each result went (delivered, retrying and why, or dead)"),
        ("ensemble", "their input sizes and normalisations may differ (each member resizes"),
    ],
)
def test_a_commands_description_flows_as_one_paragraph(command: str, sentence: str) -> None:
    """The docstrings' own line breaks were printed as they were, cutting sentences."""
    assert sentence in _help(command)


def test_text_in_angle_brackets_is_printed_not_taken_for_markup() -> None:
    assert "DATA_DIR/<class>/<patient><L|R>.<ext>" in _help("train-localiser")
    assert "a training folder (DATA/<class>/) from a PACS export" in _help("label-export")
