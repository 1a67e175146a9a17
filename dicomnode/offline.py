"""``dicomnode predict``: the node's pipeline on files, with no network and no database."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import pydicom
from PIL.PngImagePlugin import PngInfo

from dicomnode import pipeline
from dicomnode.config import Settings
from dicomnode.encode.render import SYNTHETIC_NOTICE, UInt8Array, result_lines
from dicomnode.encode.sr import SrImageItem
from dicomnode.errors import DicomNodeError, EncodeError, InferenceError
from dicomnode.inference import Predictor
from dicomnode.models.card import ModelCard
from dicomnode.models.registry import LoadedCard, ModelRegistry
from dicomnode.studies import route
from dicomnode.values import ImageResult, ModelIdentity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One line of the ``predict`` table.

    ``failed`` marks an input that could not be read or processed: a batch that a
    hospital scripts must see it in the exit status, whereas an image the node's
    routing skips on purpose (not a radiograph, no model for its body part) is a
    normal outcome.
    """

    input: str
    outcome: str
    output: str = "-"
    failed: bool = False
    extra: tuple[Row, ...] = ()
    """Rows of further objects made from the same input (its presentation state)."""

    def without_extra(self) -> Row:
        return replace(self, extra=())


def predict_files(settings: Settings, files: list[Path], out: Path) -> list[Row]:
    """Write an SC per usable image (and its presentation state with
    ``results.presentation_state``) and an SR per (study, model) into ``out``.

    Returns one row per file, per presentation state and per SR.
    """
    registry = ModelRegistry.load(settings.models.dir)
    predictors: dict[str, Predictor] = {}
    rows: list[Row] = []
    by_study: dict[tuple[str, str], list[SrImageItem]] = defaultdict(list)
    failed: dict[tuple[str, str], int] = defaultdict(int)
    out.mkdir(parents=True, exist_ok=True)
    for path in files:
        row, item = _predict_file(settings, registry, predictors, path, out)
        rows.append(row.without_extra())
        rows.extend(row.extra)
        if item is not None:
            key = (str(item.source.StudyInstanceUID), _key(item.result.model))
            by_study[key].append(item)
            failed[key] += row.failed
    for key, items in by_study.items():
        sr = pipeline.make_sr(
            items,
            uid_root=settings.node.uid_root,
            sequence=1,
            not_analysed=failed[key],
            institution_name=settings.node.institution_name,
        )
        target = out / f"SR_{sr.SOPInstanceUID}.dcm"
        sr.save_as(target, enforce_file_format=True)
        rows.append(Row(f"study {sr.StudyInstanceUID}", "structured report", str(target)))
    return rows


def _predict_file(
    settings: Settings,
    registry: ModelRegistry,
    predictors: dict[str, Predictor],
    path: Path,
    out: Path,
) -> tuple[Row, SrImageItem | None]:
    """The row of one input and, when its model was chosen, the SR item that cites it: its
    finding, or "Not assessed" with why (unreadable to the model, or its analysis failed)."""
    if not path.is_file():
        return _failed(path, _not_a_file(path)), None
    prepared = pipeline.read_and_prepare(path)
    loaded = _triage(settings, registry, path, prepared)
    if isinstance(loaded, Row):
        return loaded, None
    if prepared.error:  # routed to a model, its pixel data unreadable
        return _failed(path, prepared.error), _analysis_failed(loaded, prepared)
    if prepared.skip_reason:  # routed, and unreadable to the model: reported as such
        reason = pipeline.not_analysed_reason(prepared.skip_reason)
        return Row(str(path), f"skipped: {prepared.skip_reason}"), _not_assessed(
            loaded, prepared.header, reason
        )
    key = _key(loaded.card)
    if key not in predictors:
        predictors[key] = Predictor.load(
            loaded.directory,
            loaded.card,
            settings.workers.device,
            batch_size=settings.workers.batch_size,
            heatmap_size=settings.results.overlay_max_size,
        )
    try:
        return _write_sc(settings, predictors[key], prepared, path, out)
    except (InferenceError, EncodeError) as exc:
        return _failed(path, str(exc)), _analysis_failed(loaded, prepared)


def _analysis_failed(loaded: LoadedCard, prepared: pipeline.Prepared) -> SrImageItem | None:
    """The SR item of a routed image whose analysis failed, as the node reports a dead job;
    none when its header lacks what the SR must cite (its study and instance)."""
    header = prepared.header
    if not (header.get("StudyInstanceUID") and header.get("SOPInstanceUID")):
        return None
    return _not_assessed(loaded, header, pipeline.ANALYSIS_FAILED)


def _not_assessed(loaded: LoadedCard, header: pydicom.Dataset, comment: str) -> SrImageItem:
    """The SR item of an image its model did not assess, with the comment saying why."""
    result = ImageResult(loaded.identity, loaded.card.coded_classes(), (), comment)
    return SrImageItem(source=header, sc=None, result=result)


def _triage(
    settings: Settings, registry: ModelRegistry, path: Path, prepared: pipeline.Prepared
) -> LoadedCard | Row:
    """The model to run on an input, or the row saying why it is not analysed.

    The routing decides first, on the header: pixels that the node would never look
    at (an SR, a chest film with no model) are skipped whether they decode or not. A
    file not read as an instance at all (no SOP Class UID) fails.
    """
    if prepared.error and not prepared.header.get("SOPClassUID"):
        return _failed(path, prepared.error)
    loaded, reason = _model_for(settings, registry, prepared.header)
    if loaded is None:
        return Row(str(path), f"skipped: {reason}")
    return loaded


def _not_a_file(path: Path) -> str:
    """Say what a path given as an input file is instead (before any read fails on it)."""
    if path.is_dir():
        return "not a file (a directory)"
    return "not a file (it does not exist)" if not path.exists() else "not a file"


def _failed(path: Path, reason: str) -> Row:
    return Row(str(path), f"failed: {reason}", failed=True)


def _key(model: ModelCard | ModelIdentity) -> str:
    return f"{model.name}:{model.version}"


def _model_for(
    settings: Settings, registry: ModelRegistry, header: pydicom.Dataset
) -> tuple[LoadedCard | None, str]:
    """The model that the node's routing gives an image, else why there is none."""
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
    return loaded, decision.reason or f"no model for {decision.body_part}"


def _write_sc(
    settings: Settings, predictor: Predictor, prepared: pipeline.Prepared, path: Path, out: Path
) -> tuple[Row, SrImageItem]:
    """Run the model on one prepared image and write its SC overlay into ``out``."""
    analysed = pipeline.analyse(predictor, [prepared])[0]
    if analysed.result is None:
        raise InferenceError("the model returned no result")
    sc = pipeline.make_sc(
        analysed,
        uid_root=settings.node.uid_root,
        max_size=settings.results.overlay_max_size,
        jpeg_quality=settings.results.overlay_jpeg_quality,
        institution_name=settings.node.institution_name,
    )
    target = out / f"SC_{sc.SOPInstanceUID}.dcm"
    sc.save_as(target, enforce_file_format=True)
    side = prepared.image.laterality if prepared.image else None
    outcome = "; ".join(result_lines(analysed.result, side))
    written = _write_pr(settings, analysed, out)
    pr, extra = (None, ()) if written is None else (written[0], (_pr_row(path, written[1]),))
    item = SrImageItem(source=prepared.header, sc=sc, result=analysed.result, pr=pr)
    return Row(str(path), outcome, str(target), extra=extra), item


def _pr_row(source: Path, written: Path) -> Row:
    return Row(str(source), "presentation state", str(written))


def _write_pr(
    settings: Settings, analysed: pipeline.Analysed, out: Path
) -> tuple[pydicom.Dataset, Path] | None:
    """The image's presentation state (``results.presentation_state``) and where it was
    written into ``out``; none for a colour image."""
    if not (settings.results.presentation_state and pipeline.wants_pr(analysed)):
        return None
    pr = pipeline.make_pr(
        analysed,
        uid_root=settings.node.uid_root,
        institution_name=settings.node.institution_name,
    )
    target = out / f"PR_{pr.SOPInstanceUID}.dcm"
    pr.save_as(target, enforce_file_format=True)
    return pr, target


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

    from dicomnode.models.card import load_card

    if method not in ("gradcam", "shap"):
        raise DicomNodeError(f"unknown explanation method {method!r}; use gradcam or shap")
    card = load_card(model_dir)
    predictor = Predictor.load(model_dir, card, device)
    if method == "shap":
        from dicomnode.explain.shap_map import SHAP

        predictor = predictor.with_explainer(SHAP)
    overlay, result = _overlay(predictor, image_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay).save(out, pnginfo=_png_text(result.model))
    if result.not_assessed:  # no map was made: say why, not which map
        return out, f"{result.not_assessed} ({result.model.name} {result.model.version})"
    return out, _describe(result.model)


def _overlay(predictor: Predictor, image_path: Path) -> tuple[UInt8Array, ImageResult]:
    """The explanation overlay of one image and the result it shows.

    An error names the image by the path as given: the message otherwise does not say
    which file it is about (``the dataset has no Pixel Data``), and the path is the
    user's own text, not data read from the image.
    """
    from dicomnode.encode.render import render_overlay
    from dicomnode.imaging.pixels import read_image_file

    try:
        image = read_image_file(image_path)
        result = predictor.predict([image])[0]
        return render_overlay(image, result), result
    except DicomNodeError as exc:
        raise type(exc)(f"{image_path}: {exc}") from exc


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
