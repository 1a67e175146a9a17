"""Results to a peer's DICOMweb service by STOW-RS (``peers.NAME.dicomweb``): what each
answer means for each file, the Authorization header, https, and the peer's settings.

The service is :class:`~dicomnode.testing.peers.StowService`, a real HTTP server on
loopback that reads the multipart body as DICOM; Orthanc's DICOMweb plugin is the
acceptance test's (tests/acceptance/test_orthanc.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset

from dicomnode.config import PeerSettings, TlsSettings
from dicomnode.errors import PeerError
from dicomnode.peers import PeerInfo, destination_host, validate
from dicomnode.send.stow import stow_files
from dicomnode.testing.images import make_radiograph, write_dataset
from dicomnode.testing.peers import StowService, free_port, stow_response
from dicomnode.tls import https_context

TOKEN = "Bearer s3cr3t-t0ken"


@pytest.fixture
def service() -> Iterator[StowService]:
    started = StowService().start()
    yield started
    started.stop()


def _files(tmp_path: Path, count: int) -> list[Path]:
    return [
        write_dataset(make_radiograph(rows=64, columns=64, seed=i), tmp_path / f"{i}.dcm")
        for i in range(count)
    ]


def _peer(url: str, auth_file: str = "") -> PeerInfo:
    return PeerInfo("WEB", "WEBPACS", "127.0.0.1", 104, dicomweb=url, dicomweb_auth_file=auth_file)


def test_every_file_goes_in_one_request_as_stored_with_the_token_from_its_file(
    service: StowService, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    service.authorization = TOKEN
    auth = tmp_path / "pacs.auth"
    auth.write_text(TOKEN + "\n")
    files = _files(tmp_path, 3)
    deliveries = stow_files(_peer(service.url + "/", str(auth)), files, timeout=10)
    assert [(d.path, d.ok) for d in deliveries] == [(f, True) for f in files]
    (headers,) = service.requests
    assert headers["Content-Type"].startswith('multipart/related; type="application/dicom"')
    assert headers["Accept"] == "application/dicom+json"
    sent = [pydicom.dcmread(f) for f in files]
    assert [d.SOPInstanceUID for d in service.received] == [d.SOPInstanceUID for d in sent]
    assert service.received[0].PixelData == sent[0].PixelData  # as stored, byte for byte
    assert "s3cr3t" not in caplog.text


def test_a_renewed_token_is_read_at_the_next_send_and_a_wrong_one_is_retried(
    service: StowService, tmp_path: Path
) -> None:
    service.authorization = TOKEN
    auth = tmp_path / "pacs.auth"
    auth.write_text("Bearer expired\n")
    (file,) = _files(tmp_path, 1)
    (refused,) = stow_files(_peer(service.url, str(auth)), [file], timeout=10)
    assert not refused.ok and refused.retry and "HTTP 401" in refused.reason
    assert "expired" not in refused.reason
    auth.write_text(TOKEN)
    (delivered,) = stow_files(_peer(service.url, str(auth)), [file], timeout=10)
    assert delivered.ok
    missing = _peer(service.url, str(tmp_path / "gone.auth"))
    (unread,) = stow_files(missing, [file], timeout=10)
    assert not unread.ok and unread.retry and "cannot read dicomweb_auth_file" in unread.reason
    assert len(service.requests) == 2  # nothing sent without its token


def test_a_partial_answer_is_read_instance_by_instance(
    service: StowService, tmp_path: Path
) -> None:
    """202: stored; out of resources (0xA700, retried); cannot understand (0xC000, not);
    the object held already (0x0111, a delivery); one not named (retried)."""
    files = _files(tmp_path, 5)
    stored, full, bad, duplicate, _ = (pydicom.dcmread(f) for f in files)

    def partly(instances: list[Dataset]) -> tuple[int, dict[str, object]]:
        failed = [(full, 0xA700), (bad, 0xC000), (duplicate, 0x0111)]
        return 202, stow_response(stored=[stored], failed=failed)

    service.answer = partly
    deliveries = stow_files(_peer(service.url), files, timeout=10)
    assert [(d.ok, d.retry) for d in deliveries] == [
        (True, True),
        (False, True),
        (False, False),
        (True, True),
        (False, True),
    ]
    assert "reason 0xA700" in deliveries[1].reason
    assert "without naming the object" in deliveries[4].reason


@pytest.mark.parametrize(
    ("status", "retry"),
    [(400, False), (409, False), (413, False), (415, False), (404, True), (503, True)],
)
def test_an_answer_without_details_fails_every_file_and_says_whether_to_retry(
    service: StowService, tmp_path: Path, status: int, retry: bool
) -> None:
    service.answer = lambda instances: (status, None)
    deliveries = stow_files(_peer(service.url), _files(tmp_path, 2), timeout=10)
    assert [(d.ok, d.retry) for d in deliveries] == [(False, retry)] * 2
    assert all(f"answered HTTP {status}" in d.reason for d in deliveries)
    assert service.received == []


def test_no_service_is_retried_and_an_unreadable_file_fails_alone(tmp_path: Path) -> None:
    (good,) = _files(tmp_path, 1)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not dicom")
    nobody = _peer(f"http://127.0.0.1:{free_port()}/dicom-web")
    down, unreadable = stow_files(nobody, [good, broken], timeout=5)
    assert not down.ok and down.retry and "failed" in down.reason
    assert not unreadable.ok and not unreadable.retry and "cannot read" in unreadable.reason


@pytest.mark.skipif(not Path("/usr/bin/openssl").is_file(), reason="openssl is not installed")
def test_https_verifies_the_services_certificate(tmp_path: Path) -> None:
    import ssl

    from dicomnode.testing.tls import make_pki

    pki, stranger = make_pki(tmp_path / "pki"), make_pki(tmp_path / "other", "other")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(pki.peer.certificate, pki.peer.private_key)
    service = StowService(ssl_context=server).start()
    try:
        (file,) = _files(tmp_path, 1)
        trusting = https_context(TlsSettings(ca_certificates=pki.ca_certificate))
        (delivered,) = stow_files(_peer(service.url), [file], timeout=10, context=trusting)
        assert delivered.ok and service.url.startswith("https://")
        doubting = https_context(TlsSettings(ca_certificates=stranger.ca_certificate))
        (refused,) = stow_files(_peer(service.url), [file], timeout=10, context=doubting)
        assert not refused.ok and refused.retry and "CERTIFICATE_VERIFY_FAILED" in refused.reason
        assert len(service.received) == 1
    finally:
        service.stop()


@pytest.mark.parametrize(
    ("url", "auth", "commitment", "error"),
    [
        ("ftp://pacs/dicom-web", "", False, "http:// or https://"),
        ("https://user:pw@pacs/dicom-web", "", False, "must not hold credentials"),
        ("https://pacs/dicom-web?x=1", "", False, "without ? or #"),
        ("https://pacs:99999/dicom-web", "", False, "dicomweb URL"),
        ("", "/etc/token", False, "needs a dicomweb URL"),
        ("https://pacs/dicom-web", "", True, "Storage Commitment"),
    ],
)
def test_a_peers_dicomweb_settings_are_checked_in_the_file_and_the_database(
    url: str, auth: str, commitment: bool, error: str
) -> None:
    with pytest.raises(ValueError, match=error.replace("?", r"\?")):
        PeerSettings(
            ae_title="WEBPACS",
            host="pacs",
            port=104,
            commitment=commitment,
            dicomweb=url,
            dicomweb_auth_file=auth,
        )
    peer = PeerInfo("WEB", "WEBPACS", "pacs", 104, commitment=commitment, dicomweb=url)
    with pytest.raises(PeerError, match=error.replace("?", r"\?")):
        validate(PeerInfo(**{**peer.__dict__, "dicomweb_auth_file": auth}))


def test_a_dicomweb_peers_results_go_to_its_services_host() -> None:
    assert destination_host(_peer("https://web.pacs.example:8443/dicom-web")) == (
        "web.pacs.example"
    )
    assert destination_host(PeerInfo("P", "PACS", "pacs.example", 104)) == "pacs.example"


def test_a_batch_larger_than_a_request_goes_in_several_in_order(
    service: StowService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicomnode.send import stow

    files = _files(tmp_path, 5)
    monkeypatch.setattr(stow, "MAX_REQUEST_BYTES", 2 * files[0].stat().st_size + 1)
    deliveries = stow_files(_peer(service.url), files, timeout=10)
    assert all(d.ok for d in deliveries) and [d.path for d in deliveries] == files
    assert len(service.requests) == 3  # 2 + 2 + 1
    sent = [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
    assert [str(d.SOPInstanceUID) for d in service.received] == sent


def test_the_service_check_says_whether_the_url_and_token_work(
    service: StowService, tmp_path: Path
) -> None:
    """``dicomnode echo``'s DICOMweb half: one QIDO-RS request, nothing stored."""
    from dicomnode.send.stow import check_service

    service.authorization = TOKEN
    auth = tmp_path / "pacs.auth"
    auth.write_text(TOKEN)
    assert check_service(_peer(service.url, str(auth)), timeout=10) == (200, "")
    auth.write_text("Bearer wrong")
    assert check_service(_peer(service.url, str(auth)), timeout=10) == (401, "")
    assert check_service(_peer(service.url + "/nothing-here", str(auth)), timeout=10)[0] == 401
    gone = _peer(f"http://127.0.0.1:{free_port()}/dicom-web")
    status, reason = check_service(gone, timeout=5)
    assert status is None and "refused" in reason.lower()
    assert service.received == []
