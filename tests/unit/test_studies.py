"""Body-part routing rules."""

from __future__ import annotations

import pytest

from dicomnode.config import RoutingSettings
from dicomnode.studies import route
from dicomnode.values import BodyPart

DX = "1.2.840.10008.5.1.4.1.1.1.1"
CR = "1.2.840.10008.5.1.4.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
RULES = RoutingSettings()


@pytest.mark.parametrize(
    ("body_part", "descriptions", "expected"),
    [
        ("KNEE", "", BodyPart.KNEE),
        ("HAND", "", BodyPart.HAND),
        ("LSPINE", "", BodyPart.SPINE),
        ("CSPINE", "", BodyPart.SPINE),
        ("TSPINE", "", BodyPart.SPINE),
        ("", "XR KNEE BOTH AP", BodyPart.KNEE),
        ("", "Hand PA | right", BodyPart.HAND),
        ("", "lumbar spine lat", BodyPart.SPINE),
        ("EXTREMITY", "knee standing", BodyPart.KNEE),
    ],
)
def test_body_part_from_tag_or_descriptions(
    body_part: str, descriptions: str, expected: BodyPart
) -> None:
    assert route(DX, "DX", body_part, descriptions, RULES).body_part is expected


def test_keyword_must_be_a_whole_word() -> None:
    decision = route(DX, "DX", "", "KNEECAP PROTOCOL XYZ", RULES)
    assert decision.body_part is None and "unknown body part" in decision.reason


def test_unknown_body_part_and_modality_and_sop_class_give_reasons() -> None:
    assert "unknown body part" in route(DX, "DX", "CHEST", "", RULES).reason
    assert "modality MG" in route(DX, "MG", "KNEE", "", RULES).reason
    assert "not a radiograph SOP class" in route(CT, "CT", "KNEE", "", RULES).reason


def test_rules_are_configurable() -> None:
    rules = RoutingSettings(modalities=("CR",), body_part_aliases={"KNEE": ("KNIE",)})
    assert route(CR, "CR", "KNIE", "", rules).body_part is BodyPart.KNEE
    assert route(CR, "CR", "KNEE", "", rules).body_part is None
    assert route(DX, "DX", "KNIE", "", rules).body_part is None
