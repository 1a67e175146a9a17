"""A DICOMweb peer behind an OAuth 2.0 authorisation server: its ``dicomweb_auth_file``
describes a client, and the node asks for tokens (client credentials grant), uses each
until shortly before it expires, and asks again after a refusal.

The token endpoint is :class:`~dicomnode.testing.peers.TokenService` and the archive
:class:`~dicomnode.testing.peers.StowService`, real HTTP servers on loopback; the archive
takes only the token last issued."""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicomnode.errors import AuthorizationError
from dicomnode.peers import PeerInfo
from dicomnode.send.oauth import ClientCredentials, ServiceAccount, read_auth_file
from dicomnode.send.stow import check_service, stow_files
from dicomnode.testing.images import make_radiograph, write_dataset
from dicomnode.testing.peers import StowService, TokenService, free_port


@pytest.fixture
def archive() -> Iterator[StowService]:
    started = StowService(authorization="Bearer none-issued-yet").start()
    yield started
    started.stop()


@pytest.fixture
def sso(archive: StowService) -> Iterator[TokenService]:
    started = TokenService(stow=archive).start()
    yield started
    started.stop()


def _client_file(tmp_path: Path, sso: TokenService, **fields: Any) -> Path:
    path = tmp_path / f"oauth-{len(list(tmp_path.glob('oauth-*')))}.json"
    client = {
        "token_url": sso.url,
        "client_id": sso.client_id,
        "client_secret": sso.client_secret,
        **fields,
    }
    path.write_text(json.dumps(client, indent=2))
    return path


def _peer(archive: StowService, auth_file: Path) -> PeerInfo:
    return PeerInfo("VNA", "VNA", "", 0, dicomweb=archive.url, dicomweb_auth_file=str(auth_file))


def _file(tmp_path: Path, seed: int) -> Path:
    image = make_radiograph(rows=32, columns=32, seed=seed)
    return write_dataset(image, tmp_path / f"{seed}.dcm")


def test_a_token_is_asked_for_once_and_used_until_shortly_before_it_expires(
    archive: StowService, sso: TokenService, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sso.expires_in = 2  # renewed after half its life, as it is shorter than two minutes
    peer = _peer(archive, _client_file(tmp_path, sso, scope="pacs/.default"))
    for seed in range(3):
        (sent,) = stow_files(peer, [_file(tmp_path, seed)], timeout=10)
        assert sent.ok, sent.reason
    assert sso.issued == ["token-1"]
    assert [h["Authorization"] for h in archive.requests] == ["Bearer token-1"] * 3
    (asked,) = sso.requests
    assert (asked["grant_type"], asked["scope"]) == ("client_credentials", "pacs/.default")
    assert "client_secret" not in asked  # HTTP Basic, each part form-encoded (RFC 6749 2.3.1)
    pair = base64.b64decode(asked["Authorization"].removeprefix("Basic ")).decode()
    assert pair == "dicomnode:s3cret%3A%26%3D%2B"
    time.sleep(1.1)
    (sent,) = stow_files(peer, [_file(tmp_path, 3)], timeout=10)
    assert sent.ok and sso.issued == ["token-1", "token-2"]
    assert archive.requests[-1]["Authorization"] == "Bearer token-2"
    assert len(archive.received) == 4
    assert sso.client_secret not in caplog.text and "token-" not in caplog.text


def test_a_refused_token_is_dropped_and_a_new_one_asked_for_at_the_next_attempt(
    archive: StowService, sso: TokenService, tmp_path: Path
) -> None:
    sso.expires_in = None  # no lifetime given: the token serves until it is refused
    peer = _peer(archive, _client_file(tmp_path, sso, client_auth="post"))
    (first,) = stow_files(peer, [_file(tmp_path, 0)], timeout=10)
    assert first.ok
    archive.authorization = "Bearer revoked-by-the-archive"
    (refused,) = stow_files(peer, [_file(tmp_path, 1)], timeout=10)
    assert not refused.ok and refused.retry and "HTTP 401" in refused.reason
    (again,) = stow_files(peer, [_file(tmp_path, 1)], timeout=10)
    assert again.ok and sso.issued == ["token-1", "token-2"]
    assert sso.requests[0]["client_secret"] == sso.client_secret  # client_auth: post
    assert sso.requests[0]["Authorization"] == ""


def test_a_refused_client_is_retried_saying_what_the_endpoint_said_and_sends_nothing(
    archive: StowService, sso: TokenService, tmp_path: Path
) -> None:
    wrong = _peer(archive, _client_file(tmp_path, sso, client_secret="wrong-secret"))
    (refused,) = stow_files(wrong, [_file(tmp_path, 0)], timeout=10)
    assert not refused.ok and refused.retry
    assert f"OAuth token endpoint {sso.url}: HTTP 401 (invalid_client: Invalid client)" in (
        refused.reason
    )
    assert "wrong-secret" not in refused.reason
    nowhere = f"http://127.0.0.1:{free_port()}/token"
    down = _peer(archive, _client_file(tmp_path, sso, token_url=nowhere))
    (unreached,) = stow_files(down, [_file(tmp_path, 0)], timeout=5)
    assert not unreached.ok and unreached.retry and "refused" in unreached.reason.lower()
    assert archive.requests == []  # nothing goes without a token


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        ({"access_token": "t", "token_type": "mac"}, "token_type 'mac', not Bearer"),
        ({"token_type": "Bearer"}, "holds no access_token"),
    ],
)
def test_a_token_answer_that_is_no_bearer_token_is_refused(
    archive: StowService,
    sso: TokenService,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    answer: dict[str, str],
    error: str,
) -> None:
    monkeypatch.setattr(sso, "grant", lambda form, authorization: (200, answer))
    (refused,) = stow_files(
        _peer(archive, _client_file(tmp_path, sso)), [_file(tmp_path, 0)], timeout=10
    )
    assert not refused.ok and refused.retry and error in refused.reason


def test_echo_asks_the_archive_with_a_token_of_the_client(
    archive: StowService, sso: TokenService, tmp_path: Path
) -> None:
    peer = _peer(archive, _client_file(tmp_path, sso))
    assert check_service(peer, timeout=10) == (200, "")
    assert sso.issued == ["token-1"] and archive.received == []


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"token_url": "https://sso/token",', "not a JSON object (Expecting"),
        (
            '{"token_url": "https://sso/t", "client_id": "a", "client_secret": "b", "scopes": ""}',
            "unknown field(s) scopes",
        ),
        ('{"token_url": "https://sso/t", "client_id": "a"}', "needs client_secret"),
        (
            '{"token_url": "ftp://sso/t", "client_id": "a", "client_secret": "b"}',
            "token_url must be an http:// or https:// URL",
        ),
        (
            '{"token_url": "https://sso/t", "client_id": "a", "client_secret": "b", '
            '"client_auth": "jwt"}',
            "client_auth must be basic or post",
        ),
        (
            '{"token_url": "https://sso/t", "client_id": 7, "client_secret": "b"}',
            "client_id must be a string",
        ),
    ],
)
def test_a_malformed_client_file_says_what_is_wrong(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "client.json"
    path.write_text(text)
    with pytest.raises(AuthorizationError, match=re.escape(error)):
        read_auth_file(str(path))


def test_a_header_file_is_its_first_line_and_a_client_never_shows_its_secret(
    tmp_path: Path,
) -> None:
    header = tmp_path / "header"
    header.write_text("  Basic dXNlcjpwdw==\nsecond line\n")
    assert read_auth_file(str(header)) == "Basic dXNlcjpwdw=="
    client = tmp_path / "client.json"
    client.write_text('{"token_url": "https://sso/t", "client_id": "a", "client_secret": "XYZ"}')
    credentials = read_auth_file(str(client))
    assert isinstance(credentials, ClientCredentials) and credentials.client_secret == "XYZ"
    assert "XYZ" not in repr(credentials) and "XYZ" not in str(credentials)


def _key_pair() -> tuple[str, str]:
    """A fresh RSA key (PEM, PKCS #8 as Google's key files hold it) and its public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


def _key_file(tmp_path: Path, token_uri: str, private_key: str, **fields: str) -> Path:
    """A service account key file as the Google Cloud console gives it."""
    path = tmp_path / f"key-{len(list(tmp_path.glob('key-*')))}.json"
    key = {
        "type": "service_account",
        "project_id": "hospital-imaging",
        "private_key_id": "0a1b2c3d",
        "private_key": private_key,
        "client_email": "dicomnode@hospital-imaging.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "universe_domain": "googleapis.com",
        **fields,
    }
    path.write_text(json.dumps(key, indent=2))
    return path


def test_a_service_account_key_signs_an_assertion_traded_for_a_token(
    archive: StowService, sso: TokenService, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Cloud Healthcare API DICOM store: the key file of a Google service account; the
    node signs a JWT (RFC 7523) that the token endpoint verifies with the public key."""
    import jwt

    caplog.set_level(logging.DEBUG)
    private, public = _key_pair()
    email = "dicomnode@hospital-imaging.iam.gserviceaccount.com"
    sso.service_account = (email, public)
    peer = _peer(archive, _key_file(tmp_path, sso.url, private))
    for seed in range(2):
        (sent,) = stow_files(peer, [_file(tmp_path, seed)], timeout=10)
        assert sent.ok, sent.reason
    assert sso.issued == ["token-1"]  # asked for once, used until it nears its end
    assert [h["Authorization"] for h in archive.requests] == ["Bearer token-1"] * 2
    (asked,) = sso.requests
    assert asked["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    assert asked["Authorization"] == "" and "client_secret" not in asked
    assert jwt.get_unverified_header(asked["assertion"])["kid"] == "0a1b2c3d"
    claims = jwt.decode(asked["assertion"], public, algorithms=["RS256"], audience=sso.url)
    assert claims["iss"] == email and claims["exp"] - claims["iat"] == 3600
    assert claims["scope"] == "https://www.googleapis.com/auth/cloud-platform"
    assert private.splitlines()[1] not in caplog.text and "token-" not in caplog.text
    account = read_auth_file(str(_key_file(tmp_path, sso.url, private, scope="healthcare")))
    assert isinstance(account, ServiceAccount) and account.scope == "healthcare"
    assert private.splitlines()[1] not in repr(account)


def test_an_assertion_signed_by_another_key_is_refused_saying_why(
    archive: StowService, sso: TokenService, tmp_path: Path
) -> None:
    sso.service_account = ("dicomnode@hospital-imaging.iam.gserviceaccount.com", _key_pair()[1])
    other, _ = _key_pair()  # a key file of the account, since rotated: its key was deleted
    (refused,) = stow_files(
        _peer(archive, _key_file(tmp_path, sso.url, other)), [_file(tmp_path, 0)], timeout=10
    )
    assert not refused.ok and refused.retry
    assert "HTTP 400 (invalid_grant: Invalid JWT: Signature verification failed)" in (
        refused.reason
    )
    assert other.splitlines()[1] not in refused.reason and archive.requests == []


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"client_email": ""}, "a service account key needs client_email"),
        ({"token_uri": "ftp://oauth2/token"}, "token_uri must be an http:// or https:// URL"),
        ({"private_key": "not a key"}, "private_key is not a PEM private key"),
    ],
)
def test_a_malformed_service_account_key_says_what_is_wrong(
    tmp_path: Path, fields: dict[str, str], error: str
) -> None:
    path = _key_file(tmp_path, "https://oauth2.googleapis.com/token", "-----BEGIN PRIVATE KEY-----")
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    with pytest.raises(AuthorizationError, match=re.escape(error)):
        read_auth_file(str(path))


def test_a_key_that_cannot_sign_is_a_clear_error(
    archive: StowService, sso: TokenService, tmp_path: Path
) -> None:
    broken = "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"
    (refused,) = stow_files(
        _peer(archive, _key_file(tmp_path, sso.url, broken)), [_file(tmp_path, 0)], timeout=10
    )
    assert not refused.ok and sso.requests == []
    assert "the private key of service account dicomnode@hospital-imaging" in refused.reason
    assert "cannot sign" in refused.reason
