"""The CLI as a user runs it: predict on files, configuration errors, the database command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.encode.render import SYNTHETIC_NOTICE
from dicomnode.models.card import write_card
from dicomnode.testing.images import make_radiograph, write_dataset
from dicomnode.testing.models import make_tiny_model
from dicomnode.testing.validate import dciodvfy_errors, dsrdump

pytestmark = pytest.mark.acceptance

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "250"},
    )


def test_predict_writes_valid_sc_and_sr(tmp_path: Path) -> None:
    make_tiny_model(tmp_path / "models" / "tiny-hand", name="tiny-hand", body_part="HAND")
    study = pydicom.uid.generate_uid()
    files = [
        write_dataset(
            make_radiograph(body_part="HAND", seed=i, study_uid=study), tmp_path / f"h{i}.dcm"
        )
        for i in range(2)
    ]
    chest = write_dataset(make_radiograph(body_part="CHEST"), tmp_path / "chest.dcm")
    out = tmp_path / "out"
    result = _cli(
        "predict",
        *map(str, files),
        str(chest),
        "--out",
        str(out),
        "--models-dir",
        str(tmp_path / "models"),
        "--device",
        "cpu",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "unknown body part" in result.stdout
    scs, srs = sorted(out.glob("SC_*.dcm")), sorted(out.glob("SR_*.dcm"))
    assert len(scs) == 2 and len(srs) == 1
    for path in [*scs, *srs]:
        assert dciodvfy_errors(path) == []
    dump = dsrdump(srs[0])
    assert dump.returncode == 0 and "tiny-hand" in dump.stdout
    sc = pydicom.dcmread(scs[0])
    assert sc.StudyInstanceUID == study and sc.BurnedInAnnotation == "YES"
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]


def test_an_ensemble_of_members_of_several_inputs_writes_valid_sc_and_sr(tmp_path: Path) -> None:
    """The study's ensembles mix input sizes (Xception 299 px, ResNet50 224 px): the node
    serves such an ensemble as one model."""
    make_tiny_model(tmp_path / "members" / "large", name="knee-large", body_part="KNEE")
    make_tiny_model(
        tmp_path / "members" / "small",
        name="knee-small",
        body_part="KNEE",
        input_size=(40, 40),
        channels=1,
        seed=1,
    )
    members = ["members/large", "members/small"]
    built = _cli(
        "ensemble", "models/knee-mixed", *members, "--method", "average", "--name", "knee-mixed",
        cwd=tmp_path,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    said = " ".join((built.stdout + built.stderr).split())
    assert "the members take 40x40 and 64x64 inputs" in said and "resized twice" in said
    image = write_dataset(make_radiograph(body_part="KNEE", seed=3), tmp_path / "knee.dcm")
    out = tmp_path / "out"
    args = ["--out", str(out), "--models-dir", "models", "--device", "cpu"]
    result = _cli("predict", str(image), *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (sc,), (sr,) = sorted(out.glob("SC_*.dcm")), sorted(out.glob("SR_*.dcm"))
    assert dciodvfy_errors(sc) == [] and dciodvfy_errors(sr) == []
    dump = dsrdump(sr)
    assert dump.returncode == 0 and "knee-mixed" in dump.stdout


def test_predict_exits_1_when_an_input_cannot_be_read(tmp_path: Path) -> None:
    """A scripted batch must see unreadable inputs; images the routing skips are not failures."""
    make_tiny_model(tmp_path / "models" / "tiny-hand", name="tiny-hand", body_part="HAND")
    hand = write_dataset(make_radiograph(body_part="HAND"), tmp_path / "hand.dcm")
    chest = write_dataset(make_radiograph(body_part="CHEST"), tmp_path / "chest.dcm")
    (tmp_path / "folder").mkdir()
    (tmp_path / "empty.dcm").write_bytes(b"")
    common = ["--out", "out", "--models-dir", "models", "--device", "cpu"]
    inputs = ["folder", "missing.dcm", "empty.dcm", "chest.dcm", "hand.dcm"]
    broken = _cli("predict", *inputs, *common, cwd=tmp_path)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "Traceback" not in broken.stderr
    assert "not a file (a directory)" in broken.stdout
    assert "not a file (it does not exist)" in broken.stdout
    assert "empty.dcm" in broken.stdout and "unknown body part" in broken.stdout
    assert broken.stdout.count("failed:") == 3
    assert broken.stdout.rstrip().splitlines()[-1] == "3 of 5 input(s) failed"
    assert len(list((tmp_path / "out").glob("SC_*.dcm"))) == 1  # the readable hand still ran
    skipped_only = _cli("predict", str(chest), str(hand), *common, cwd=tmp_path)
    assert skipped_only.returncode == 0, skipped_only.stdout + skipped_only.stderr
    assert skipped_only.stdout.rstrip().splitlines()[-1] == "0 of 2 input(s) failed"


def test_bad_config_stops_with_the_key_named(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("workers: {count: 1, batch: 8}\n")
    result = _cli("--config", str(config), "db", "upgrade", cwd=tmp_path)
    assert result.returncode == 2
    assert "workers.batch" in result.stderr


def test_predict_takes_the_device_from_the_settings_unless_given(tmp_path: Path) -> None:
    """A flag that is not given changes nothing: the environment's workers.device holds."""
    image = write_dataset(make_radiograph(), tmp_path / "k.dcm")
    args = ["predict", str(image), "--out", str(tmp_path / "o"), "--models-dir", str(tmp_path)]
    env = {**os.environ, "COLUMNS": "250", "DICOMNODE_WORKERS__DEVICE": "tpu"}
    run = [sys.executable, "-m", "dicomnode.cli"]
    settings_only = subprocess.run(
        [*run, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert settings_only.returncode == 2
    assert "DICOMNODE_WORKERS__DEVICE" in settings_only.stderr
    flag = subprocess.run(
        [*run, *args, "--device", "cpu"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert "DICOMNODE_WORKERS__DEVICE" not in flag.stderr  # the flag overrides it


def test_serve_refuses_an_unmigrated_database_and_db_upgrade_fixes_it(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        f"database: {{url: 'sqlite:///{tmp_path}/n.db'}}\nmodels: {{dir: {tmp_path}}}\n"
    )
    status = _cli("--config", str(config), "status", cwd=tmp_path)
    assert status.returncode == 2 and "dicomnode db upgrade" in status.stderr
    assert _cli("--config", str(config), "db", "upgrade", cwd=tmp_path).returncode == 0
    status = _cli("--config", str(config), "status", cwd=tmp_path)
    assert status.returncode == 0 and "Jobs by state" in status.stdout
    assert "images held" in status.stdout and "0 (0.0 MB as received)" in status.stdout
    assert "30 days after a study's newest image, once it is finished" in status.stdout
    assert "kept for good" in status.stdout
    as_json = _cli("--config", str(config), "status", "--json", cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert (data["studies"], data["jobs"], data["dead_total"]) == ([], {}, 0)
    storage = data["storage"]
    assert (storage["images_held"], storage["retention_days"], storage["records_days"]) == (
        0,
        30,
        0,
    )
    assert storage["free_mb"] > 0 and storage["min_free_mb"] > 0
    assert data["audit"] == {"destination": "off", "waiting": 0, "oldest_waiting_since": None}


def test_echo_gives_the_peers_status_or_its_reason_to_refuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from dicomnode.testing.peers import free_port

    pacs = AE(ae_title="PACS")
    pacs.add_supported_context(Verification)
    pacs.require_calling_aet = ["REGISTERED"]
    port = free_port()
    config = tmp_path / "c.yaml"
    config.write_text(
        f"database: {{url: 'sqlite:///{tmp_path}/n.db'}}\nmodels: {{dir: {tmp_path}}}\n"
        f"peers: {{PACS: {{ae_title: PACS, host: 127.0.0.1, port: {port}}}}}\n"
    )
    assert _cli("--config", str(config), "db", "upgrade", cwd=tmp_path).returncode == 0
    server = pacs.start_server(("127.0.0.1", port), block=False)
    assert server is not None
    try:
        refused = _cli("--config", str(config), "echo", "PACS", cwd=tmp_path)
        monkeypatch.setenv("DICOMNODE_NODE__AE_TITLE", "REGISTERED")
        answered = _cli("--config", str(config), "echo", "PACS", cwd=tmp_path)
    finally:
        server.shutdown()
    assert refused.returncode == 1
    assert f"C-ECHO PACS (PACS@127.0.0.1:{port}): association rejected" in refused.stderr
    assert "Calling AE title not recognised" in refused.stderr
    assert answered.returncode == 0, answered.stderr
    assert f"C-ECHO PACS (PACS@127.0.0.1:{port}): status 0x0000" in answered.stdout


def test_a_dicomweb_only_peer_behind_oauth_is_added_listed_and_echoed(tmp_path: Path) -> None:
    """An archive reached by STOW-RS alone, its tokens from an OAuth 2.0 client: `ae add`
    needs no DICOM address, `ae list` shows none, and `echo` skips the C-ECHO and asks the
    service for one study with a token it got (the secret in no output); a service that
    takes no query (405) passes, saying so."""
    from dicomnode.testing.peers import StowService, TokenService

    archive = StowService(authorization="Bearer none-yet").start()
    sso = TokenService(stow=archive).start()
    client = tmp_path / "vna-client.json"
    client.write_text(
        json.dumps(
            {"token_url": sso.url, "client_id": sso.client_id, "client_secret": sso.client_secret}
        )
    )
    config = tmp_path / "c.yaml"
    config.write_text(f"database: {{url: 'sqlite:///{tmp_path}/n.db'}}\n")
    run = ("--config", str(config))
    assert _cli(*run, "db", "upgrade", cwd=tmp_path).returncode == 0
    try:
        no_url = _cli(*run, "ae", "add", "VNA", "--ae-title", "VNA", cwd=tmp_path)
        web = ("--dicomweb", archive.url, "--dicomweb-auth-file", str(client))
        added = _cli(*run, "ae", "add", "VNA", "--ae-title", "VNA", *web, cwd=tmp_path)
        listed = _cli(*run, "ae", "list", cwd=tmp_path)
        echoed = _cli(*run, "echo", "VNA", cwd=tmp_path)
        archive.qido = False
        stow_only = _cli(*run, "echo", "VNA", cwd=tmp_path)
    finally:
        sso.stop()
        archive.stop()
    assert no_url.returncode != 0 and "needs a dicomweb URL" in no_url.stderr
    assert added.returncode == 0, added.stderr
    assert "added peer VNA: VNA (no DICOM port, no host)" in added.stdout
    row = next(line for line in listed.stdout.splitlines() if "VNA" in line)
    assert "none" in row and f"STOW-RS {archive.url}" in row
    assert echoed.returncode == 0, echoed.stderr
    assert "VNA has no DICOM port: no C-ECHO" in echoed.stdout
    assert f"DICOMweb {archive.url}/studies: HTTP 200" in echoed.stdout
    # one token per echo (a process of its own); the 200 needed it: the archive takes the
    # token last issued alone
    assert sso.issued == ["token-1", "token-2"]
    assert stow_only.returncode == 0, stow_only.stderr  # 405: it answers, and takes no query
    assert "HTTP 405: the service takes no QIDO-RS query" in stow_only.stdout
    for said in (added, listed, echoed):
        assert sso.client_secret not in said.stdout + said.stderr


def test_discard_needs_job_ids_or_all_dead(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"database: {{url: 'sqlite:///{tmp_path}/n.db'}}\n")
    assert _cli("--config", str(config), "db", "upgrade", cwd=tmp_path).returncode == 0
    bare = _cli("--config", str(config), "discard", cwd=tmp_path)
    assert bare.returncode == 2 and "--job ID" in bare.stderr and "--all-dead" in bare.stderr
    every = _cli("--config", str(config), "discard", "--all-dead", cwd=tmp_path)
    assert every.returncode == 0 and "discarded 0 job(s)" in every.stdout
    named = _cli("--config", str(config), "discard", "--job", "7", cwd=tmp_path)
    assert named.returncode == 0 and "1 of the given job ids are not dead jobs" in named.stderr


def test_purge_reports_what_it_would_delete(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        f"database: {{url: 'sqlite:///{tmp_path}/n.db'}}\nstorage: {{retention_days: 14}}\n"
    )
    assert _cli("--config", str(config), "db", "upgrade", cwd=tmp_path).returncode == 0
    dry = _cli("--config", str(config), "purge", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "would purge 0 study(ies) older than 14 days: 0 file(s), 0.0 MB" in dry.stdout
    assert "records are kept for good (storage.records_days is 0)" in dry.stdout
    off = _cli("--config", str(config), "purge", "--older-than-days", "0", cwd=tmp_path)
    assert off.returncode == 0 and "retention is off" in off.stdout
    config.write_text(
        config.read_text().replace("retention_days: 14", "retention_days: 14, records_days: 365")
    )
    records = _cli("--config", str(config), "purge", "--dry-run", cwd=tmp_path)
    assert records.returncode == 0, records.stderr
    assert "would forget 0 purged study(ies) older than 365 days: 0 file(s)" in records.stdout


def test_forget_asks_first_and_says_what_it_deleted(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"database: {{url: 'sqlite:///{tmp_path}/n.db'}}\n")
    assert _cli("--config", str(config), "db", "upgrade", cwd=tmp_path).returncode == 0
    asked = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "--config", str(config), "forget", "1.2.3"],
        cwd=tmp_path,
        input="n\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert asked.returncode == 1 and "Delete 1 study(ies) for good?" in asked.stdout
    assert "deleted" not in asked.stdout
    done = _cli("--config", str(config), "forget", "1.2.3", "--yes", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "deleted study 1.2.3: 0 instance(s), 0 result object(s), 0 file(s)" in done.stdout


def test_output_to_a_pipe_is_not_cut_to_80_columns(tmp_path: Path) -> None:
    """`status > file` or `docker compose exec -T` cut UIDs to `1.2.826.0.1.3…`."""
    environ = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    code = "from dicomnode.cli import console, err; print(console.width, err.width)"
    piped = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=120
    )
    assert piped.stdout.split() == ["250", "250"]
    narrow = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**environ, "COLUMNS": "100"},
        timeout=120,
    )
    assert narrow.stdout.split() == ["100", "100"]  # COLUMNS, when set, is the width


def test_ae_list_shows_the_configuration_files_peers_before_the_first_serve(
    tmp_path: Path,
) -> None:
    """`echo PACS` worked from the file while `ae list` showed no PACS until serve ran."""
    config = tmp_path / "c.yaml"
    config.write_text(
        f"database: {{url: 'sqlite:///{tmp_path}/n.db'}}\n"
        "peers: {PACS: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242}}\n"
    )
    assert _cli("--config", str(config), "db", "upgrade", cwd=tmp_path).returncode == 0
    listed = _cli("--config", str(config), "ae", "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "ORTHANC" in listed.stdout and "registered when serve starts" in listed.stdout


def test_invalid_model_card_refuses_start(tmp_path: Path) -> None:
    card = make_tiny_model(tmp_path / "models" / "broken")
    weights = tmp_path / "models" / "broken" / card.weights.file
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    image = write_dataset(make_radiograph(), tmp_path / "k.dcm")
    result = _cli(
        "predict",
        str(image),
        "--out",
        str(tmp_path / "o"),
        "--models-dir",
        str(tmp_path / "models"),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "sha256" in result.stderr


@pytest.mark.parametrize("method", ["gradcam", "shap"])
def test_explain_writes_an_overlay_png(tmp_path: Path, method: str) -> None:
    from PIL import Image, PngImagePlugin

    card = make_tiny_model(tmp_path / "m", num_classes=3)
    write_card(tmp_path / "m", card.model_copy(update={"reader_note": "Read the grade only."}))
    source = tmp_path / "knee.png"
    picture = make_radiograph(rows=200, columns=160, bits_stored=8).pixel_array
    Image.fromarray(picture.astype("uint8")).save(source)
    out = tmp_path / f"{method}.png"
    result = _cli(
        "explain",
        str(tmp_path / "m"),
        str(source),
        "--method",
        method,
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    shows = "SHAP (expected gradients), smoothed" if method == "shap" else "Grad-CAM at features"
    with Image.open(out) as png:
        assert isinstance(png, PngImagePlugin.PngImageFile)
        assert png.text["Description"].startswith(f"{shows} of ")
        assert png.text["Warning"] == SYNTHETIC_NOTICE
        assert png.text["Comment"] == f"{card.name} {card.version}: Read the grade only."
    assert shows in result.stdout
    assert out.stat().st_mode & 0o027 == 0  # a patient's image: not for other local users
    overlay = np.asarray(Image.open(out))
    assert overlay.shape[1:] == (160, 3) and overlay.shape[0] > 200  # the image and its band
    coloured = (overlay.max(axis=2).astype(int) - overlay.min(axis=2)) > 40
    assert coloured.mean() > 0.01  # heat colours are drawn over the grey image


def test_explain_names_the_image_it_cannot_explain(tmp_path: Path) -> None:
    make_tiny_model(tmp_path / "m")
    dataset = make_radiograph()
    del dataset.PixelData
    (tmp_path / "scans").mkdir()
    write_dataset(dataset, tmp_path / "scans" / "no-pixels.dcm")
    result = _cli("explain", "m", "scans/no-pixels.dcm", "--out", "e.png", cwd=tmp_path)
    assert result.returncode == 2
    assert "error: scans/no-pixels.dcm: " in result.stderr  # the path as typed
    assert "Pixel Data" in result.stderr and "Traceback" not in result.stderr


def test_pointing_compares_explanations_on_a_phantom_folder(tmp_path: Path) -> None:
    import json

    from dicomnode.models.card import GradCamSpec, load_card
    from dicomnode.training.phantoms.dataset import write_phantom_folder
    from dicomnode.training.pointing import pointing_game

    data = write_phantom_folder(tmp_path / "spine", body_part="SPINE", count=8, seed=3, size=96)
    make_tiny_model(tmp_path / "m", body_part="SPINE", num_classes=2, channels=1)
    out = tmp_path / "pointing.json"
    layers = ("features.0", "features.0+features.1")
    args = ["pointing", str(tmp_path / "m"), str(data), "--out", str(out)]
    args += ["--method", "gradcam", "--method", "layercam", "--layer", layers[0]]
    result = _cli(*args, "--layer", layers[1], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    games = json.loads(out.read_text())
    assert [g["explanation"] for g in games] == [
        f"{name} at {layer}" for name in ("Grad-CAM", "LayerCAM") for layer in layers
    ]
    direct = pointing_game(
        tmp_path / "m", data, gradcam=GradCamSpec(target_layer=layers[1], method="layercam")
    )
    assert games[3] == {"explanation": "LayerCAM at features.0+features.1", **direct}
    assert "LayerCAM at features.0+features.1" in result.stdout
    refused = _cli("pointing", str(tmp_path / "m"), str(data), "--method", "saliency", cwd=tmp_path)
    assert refused.returncode == 2 and "saliency" in refused.stderr
    # --shift alone: the card's method and layer, one pass and shift-averaged.
    args = ["pointing", str(tmp_path / "m"), str(data), "--out", str(out), "--shift", "0"]
    assert _cli(*args, "--shift", "2", cwd=tmp_path).returncode == 0
    own = load_card(tmp_path / "m").gradcam
    shifted = own.model_copy(update={"shift": 2})
    assert [g["explanation"] for g in json.loads(out.read_text())] == [
        own.description,
        f"{own.description}, mean of 13 copies shifted up to 2 px",
    ]
    assert json.loads(out.read_text())[1] == {
        "explanation": shifted.description,
        **pointing_game(tmp_path / "m", data, gradcam=shifted),
    }
    # SHAP beside a Grad-CAM: it has no layer, so it is scored once.
    args = ["pointing", str(tmp_path / "m"), str(data), "--out", str(out), "--layer", layers[0]]
    result = _cli(*args, "--method", "gradcam", "--method", "shap", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    games = json.loads(out.read_text())
    assert [g["explanation"] for g in games] == [
        f"Grad-CAM at {layers[0]}",
        "SHAP (expected gradients), smoothed",
    ]
    assert games[0]["abnormal_images"] == games[1]["abnormal_images"] > 0
    # SHAP alone with a layer: the layer would be ignored, so it is refused.
    refused = _cli(*args, "--method", "shap", cwd=tmp_path)
    assert refused.returncode == 2 and "SHAP has no layer" in refused.stderr


def test_bench_explain_prints_time_and_memory_of_an_explanation(tmp_path: Path) -> None:
    from dicomnode.bench.explain import explanation_cost
    from dicomnode.models.card import GradCamSpec

    make_tiny_model(tmp_path / "m")
    result = _cli(
        "bench-explain",
        str(tmp_path / "m"),
        "--method",
        "layercam",
        "--layer",
        "features.0+features.1",
        "--batch",
        "2",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "LayerCAM at features.0+features.1:" in result.stdout
    assert "ms per image (batch 2" in result.stdout
    spec = GradCamSpec(target_layer="features.1", method="hirescam")
    cost = explanation_cost(tmp_path / "m", spec, batch=3, repeats=2)
    assert cost.explanation == "HiResCAM at features.1" and cost.batch == 3
    assert cost.ms_per_image > 0 and cost.peak_rss_rise_mb >= 0


def test_set_test_time_flip_revises_a_card_or_says_why_not(tmp_path: Path) -> None:
    from dicomnode.models.card import load_card

    card = make_tiny_model(tmp_path / "m")
    write_card(tmp_path / "m", card.model_copy(update={"recipe": {"augment": {}}}))
    refused = _cli("set-test-time-flip", "m", "--version", "0.0.2", cwd=tmp_path)
    assert refused.returncode == 2 and "not trained on mirrored images" in refused.stderr
    assert not load_card(tmp_path / "m").test_time_flip
    recipe = {"augment": {"enabled": True, "horizontal_flip": True}}
    write_card(tmp_path / "m", card.model_copy(update={"recipe": recipe}))
    result = _cli("set-test-time-flip", "m", "--version", "0.0.2", "--note", "why", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "updated" in result.stdout and "model.yaml" in result.stdout
    flipped = load_card(tmp_path / "m")
    assert flipped.test_time_flip and flipped.version == "0.0.2"
    assert flipped.recipe["notes"] == "why"


def test_pretrained_says_where_imagenet_weights_are_looked_for(tmp_path: Path) -> None:
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "COLUMNS": "250"}
    command = [sys.executable, "-m", "dicomnode.cli", "pretrained", "resnet50"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    assert result.stdout.splitlines()[:2] == [
        "resnet50: missing",
        f"  looked in: {checkpoints / 'resnet50-11ad3fa6.pth'}",
    ]
    checkpoints.mkdir(parents=True)
    (checkpoints / "resnet50-0676ba61.pth").write_bytes(b"copied from another machine")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert f"resnet50: {checkpoints / 'resnet50-0676ba61.pth'}" in result.stdout
    bad = subprocess.run([*command[:-1], "small_vgg"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "small_vgg' has no ImageNet weights" in bad.stderr


def test_train_prints_the_cross_validation_it_wrote(tmp_path: Path) -> None:
    import yaml

    from dicomnode.models.card import load_card
    from dicomnode.training.tiny import write_tiny_dataset

    raw = yaml.safe_load((ROOT / "config" / "training" / "tiny-smoke.yaml").read_text())
    raw.update(
        data_dir=str(write_tiny_dataset(tmp_path / "data", classes=3, patients=8, size=32)),
        output_dir=str(tmp_path / "model"),
        checkpoint_dir=str(tmp_path / "checkpoints"),
        cache_dir=str(tmp_path / "cache"),
        folds=3,
        fold="all",
        epochs=1,
    )
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    result = _cli("train", str(tmp_path / "recipe.yaml"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = load_card(tmp_path / "model").metrics["cross_validation"]
    balanced = summary["balanced_accuracy"]
    assert "value (folds, mean ± sd)" in result.stdout
    assert f"{balanced['mean']:.3f} ± {balanced['sd']:.3f}" in result.stdout
    f1 = summary["f1_per_class_mean"][2], summary["f1_per_class_sd"][2]
    large = next(line for line in result.stdout.splitlines() if "│ large" in line)
    assert f"{f1[0]:.3f} ± {f1[1]:.3f}" in large
    assert "tiny-smoke 0.0.1" in result.stdout


def test_health_passes_on_a_working_node_and_fails_when_its_listener_is_gone(
    tmp_path: Path,
) -> None:
    from dicomnode.testing.node import NodeProcess

    make_tiny_model(tmp_path / "models" / "tiny-knee", num_classes=5, input_size=(96, 96))
    node = NodeProcess.create(
        tmp_path / "node", tmp_path / "models", peers={"MOD": ("MOD", 104)}, destinations=[]
    )
    node.start()
    try:
        node.wait_for_workers()
        healthy = node.cli("health", check=False)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        lines = healthy.stdout.splitlines()
        assert [line.split(":")[0] for line in lines] == [
            "ok   database",
            "ok   scp",
            "ok   disk",
            "ok   queue",
        ]
        assert "probe is rejected" in healthy.stdout
        assert "rejected" not in node.log()  # the probe is not an intruder to warn about
    finally:
        node.stop()
    down = node.cli("health", check=False)
    assert down.returncode == 1
    assert "FAIL scp: 127.0.0.1:" in down.stdout and "does not answer" in down.stdout
    as_json = node.cli("health", "--json", check=False)
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["ok"] is False
    assert [(c["name"], c["ok"]) for c in report["checks"]] == [
        ("database", True),
        ("scp", False),
        ("disk", True),
        ("queue", True),
    ]
    assert "does not answer" in report["checks"][1]["detail"]
    worker_host = node.cli("health", "--no-scp", check=False)  # a worker host has no listener
    assert worker_host.returncode == 0 and "scp" not in worker_host.stdout


def test_resend_names_what_it_cannot_send(tmp_path: Path) -> None:
    """An unknown study: exit status 1 and why; an unknown peer: the known ones are named."""
    config = tmp_path / "c.yaml"
    config.write_text(f"database: {{url: 'sqlite:///{tmp_path}/n.db'}}\n")
    assert _cli("--config", str(config), "db", "upgrade", cwd=tmp_path).returncode == 0
    add = ("ae", "add", "PACS", "--ae-title", "PACS", "--host", "127.0.0.1", "--port", "11113")
    assert _cli("--config", str(config), *add, cwd=tmp_path).returncode == 0
    unknown = _cli("--config", str(config), "resend", "1.2.3", "--to", "PACS", cwd=tmp_path)
    assert unknown.returncode == 1 and "holds no record of study 1.2.3" in unknown.stderr
    nowhere = _cli("--config", str(config), "resend", "1.2.3", "--to", "ARCH", cwd=tmp_path)
    assert nowhere.returncode == 2 and "ARCH" in nowhere.stderr, nowhere.stderr
