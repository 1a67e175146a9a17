"""``dicomnode predict``: the node's pipeline on files, with no network and no database."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

from dicomnode import pipeline
from dicomnode.config import Settings
from dicomnode.encode.render import SYNTHETIC_NOTICE
from dicomnode.encode.sr import SrImageItem
from dicomnode.errors import DicomNodeError
from dicomnode.inference import Predictor
from dicomnode.models.registry import ModelRegistry
from dicomnode.studies import route
from dicomnode.values import ModelIdentity

log = logging.getLogger(__name__)


def predict_files(settings: Settings, files: list[Path], out: Path) -> list[tuple[str, str, str]]:
    """Write an SC per usable image and an SR per (study, model) into ``out``.

    Returns one (input, outcome, output) row per file and per SR.
    """
    registry = ModelRegistry.load(settings.models.dir)
    predictors: dict[str, Predictor] = {}
    rows: list[tuple[str, str, str]] = []
    by_study: dict[tuple[str, str], list[SrImageItem]] = defaultdict(list)
    out.mkdir(parents=True, exist_ok=True)
    for path in files:
        prepared = pipeline.read_and_prepare(path)
        if prepared.error or prepared.skip_reason:
            rows.append((str(path), f"skipped: {prepared.error or prepared.skip_reason}", "-"))
            continue
        header = prepared.header
        decision = route(
            str(header.get("SOPClassUID", "")),
            str(header.get("Modality", "")).upper(),
            str(header.get("BodyPartExamined", "")).upper(),
            " ".join(
                str(header.get(k, ""))
                for k in ("StudyDescription", "SeriesDescription", "ProtocolName")
            ),
            settings.routing,
        )
        loaded = registry.for_body_part(decision.body_part) if decision.body_part else None
        if loaded is None:
            rows.append(
                (
                    str(path),
                    f"skipped: {decision.reason or 'no model for ' + str(decision.body_part)}",
                    "-",
                )
            )
            continue
        key = f"{loaded.card.name}:{loaded.card.version}"
        if key not in predictors:
            predictors[key] = Predictor.load(
                loaded.directory,
                loaded.card,
                settings.workers.device,
                batch_size=settings.workers.batch_size,
                heatmap_size=settings.results.overlay_max_size,
            )
        analysed = pipeline.analyse(predictors[key], [prepared])[0]
        if analysed.result is None:
            raise DicomNodeError(f"{path}: the model returned no result")
        sc = pipeline.make_sc(
            analysed,
            uid_root=settings.node.uid_root,
            max_size=settings.results.overlay_max_size,
            jpeg_quality=settings.results.overlay_jpeg_quality,
            institution_name=settings.node.institution_name,
        )
        target = out / f"SC_{sc.SOPInstanceUID}.dcm"
        sc.save_as(target, enforce_file_format=True)
        finding = analysed.result.findings[0]
        rows.append(
            (
                str(path),
                f"{finding.predicted.code_meaning} p={finding.probability:.2f}",
                str(target),
            )
        )
        by_study[(str(header.StudyInstanceUID), key)].append(
            SrImageItem(source=header, sc=sc, result=analysed.result)
        )
    for items in by_study.values():
        sr = pipeline.make_sr(
            items,
            uid_root=settings.node.uid_root,
            sequence=1,
            institution_name=settings.node.institution_name,
        )
        target = out / f"SR_{sr.SOPInstanceUID}.dcm"
        sr.save_as(target, enforce_file_format=True)
        rows.append((f"study {sr.StudyInstanceUID}", "structured report", str(target)))
    return rows


def explain_file(
    model_dir: Path, image_path: Path, method: str, out: Path, device: str = "cpu"
) -> tuple[Path, str]:
    """Write the explanation overlay of one image (PNG, WebP, JPEG or DICOM) as a PNG.

    ``method`` is ``gradcam`` (what the node shows) or ``shap`` (expected
    gradients with the ``shap`` library; slower, offline only). Either is made
    for every finding the node would report: each knee of a bilateral film on a
    localiser card. Returns the PNG's path and what it shows ("<explanation> of
    <model> <version>", also its ``Description`` text chunk; a synthetic-data
    model's PNG carries the demonstration notice as ``Warning``, and the card's
    reader note, as the SR states it, as ``Comment``).
    """
    from PIL import Image

    from dicomnode.encode.render import render_overlay
    from dicomnode.imaging.pixels import read_image_file
    from dicomnode.models.card import load_card

    if method not in ("gradcam", "shap"):
        raise DicomNodeError(f"unknown explanation method {method!r}; use gradcam or shap")
    card = load_card(model_dir)
    predictor = Predictor.load(model_dir, card, device)
    if method == "shap":
        from dicomnode.explain.shap_map import SHAP

        predictor = predictor.with_explainer(SHAP)
    image = read_image_file(image_path)
    result = predictor.predict([image])[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    text = _png_text(result.model)
    Image.fromarray(render_overlay(image, result)).save(out, pnginfo=text)
    return out, _describe(result.model)


def _describe(model: ModelIdentity) -> str:
    return f"{model.explanation} of {model.name} {model.version}"


def _png_text(model: ModelIdentity) -> PngInfo:
    """PNG text chunks naming the explanation and the model (viewers show ``Description``)."""
    info = PngInfo()
    info.add_text("Description", _describe(model))
    info.add_text("Software", "dicomnode")
    if model.synthetic_training_data:
        info.add_text("Warning", SYNTHETIC_NOTICE)
    if model.reader_note:
        info.add_text("Comment", f"{model.name} {model.version}: {model.reader_note}")
    return info
