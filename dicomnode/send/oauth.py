"""The Authorization header of a peer's DICOMweb service, from its ``dicomweb_auth_file``.

The file holds one of three things:

- the header value itself, on its first line: ``Bearer <token>`` or ``Basic <base64>``
  (renewed in place by whoever issues it: read at each request);
- an OAuth 2.0 client, as a JSON object, for a service behind an authorisation server
  (Keycloak in front of dcm4chee-arc, Microsoft Entra ID in front of a cloud DICOM service)::

      {"token_url": "https://sso.example/realms/pacs/protocol/openid-connect/token",
       "client_id": "dicomnode", "client_secret": "…",
       "scope": "", "audience": "", "client_auth": "basic"}

  The node asks ``token_url`` for an access token with the client credentials grant
  (RFC 6749 section 4.4): ``grant_type=client_credentials`` and ``scope`` / ``audience``
  when given; the client authenticates by HTTP Basic (``client_auth: basic``, the
  RFC's default) or in the form (``post``). It sends ``Bearer <access_token>`` until a
  minute before the token expires (``expires_in``; a token without one until the service
  refuses it), then asks again. A 401 from the service drops the token, so the next attempt
  asks for a fresh one;
- a Google Cloud service account key, the JSON file the console gives (``"type":
  "service_account"``), for a Cloud Healthcare API DICOM store: the node signs a JWT with
  the key (RS256, its ``private_key_id`` as ``kid``; issuer ``client_email``, audience
  ``token_uri``, ``scope`` cloud-platform unless the file adds a ``scope`` field, one hour)
  and trades it at ``token_uri`` for an access token (the JWT bearer grant, RFC 7523 2.1),
  used and renewed as above.

The secret, the private key and the tokens never reach a log line or an error message; what
the token endpoint says about a refusal (its ``error`` and ``error_description``) does.
"""

from __future__ import annotations

import base64
import json
import math
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Literal

from dicomnode.errors import AuthorizationError

RENEW_BEFORE_SECONDS = 60.0
"""A token is renewed this long before it expires (half its lifetime when that is shorter)."""

_FIELDS = frozenset({"token_url", "client_id", "client_secret", "scope", "audience", "client_auth"})

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
"""The scope asked for with a service account key that names none (the Cloud Healthcare API
takes it, as ``gcloud`` does)."""
ASSERTION_SECONDS = 3600
"""The lifetime of a signed assertion (Google accepts at most an hour)."""


@dataclass(frozen=True)
class ClientCredentials:
    """An OAuth 2.0 client of the client credentials grant."""

    token_url: str
    client_id: str
    client_secret: str
    scope: str = ""
    audience: str = ""
    client_auth: Literal["basic", "post"] = "basic"

    def __repr__(self) -> str:  # never the secret
        return f"ClientCredentials(token_url={self.token_url!r}, client_id={self.client_id!r})"


@dataclass(frozen=True)
class ServiceAccount:
    """A Google Cloud service account key: the JWT bearer grant (RFC 7523)."""

    token_url: str
    client_email: str
    private_key: str
    """PEM, as the key file holds it."""
    key_id: str = ""
    scope: str = GOOGLE_SCOPE

    def __repr__(self) -> str:  # never the key
        return f"ServiceAccount(token_url={self.token_url!r}, client_email={self.client_email!r})"


Client = ClientCredentials | ServiceAccount
"""An OAuth 2.0 client the node asks tokens for."""


@dataclass(frozen=True)
class _Token:
    value: str
    renew_at: float
    """``time.monotonic()`` after which a new token is asked for."""


_tokens: dict[Client, _Token] = {}
_lock = threading.Lock()


def authorization(auth_file: str, *, timeout: float, context: ssl.SSLContext | None = None) -> str:
    """The Authorization header value ``auth_file`` gives ("" for no file): its first line,
    or a Bearer token of the OAuth client it describes (asked for when none is held or it
    is about to expire). Raises OSError for an unreadable file and
    :class:`AuthorizationError` for a malformed one or a token that cannot be had."""
    if not auth_file:
        return ""
    held = read_auth_file(auth_file)
    if isinstance(held, str):
        return held
    with _lock:
        token = _tokens.get(held)
    if token is None or time.monotonic() >= token.renew_at:
        token = _request_token(held, timeout, context)
        with _lock:
            _tokens[held] = token
    return f"Bearer {token.value}"


def forget(auth_file: str) -> None:
    """Drop the token held for ``auth_file``'s client (the service refused it: 401)."""
    try:
        held = read_auth_file(auth_file) if auth_file else ""
    except (OSError, AuthorizationError):
        return
    if not isinstance(held, str):
        with _lock:
            _tokens.pop(held, None)


def read_auth_file(path: str) -> str | Client:
    """The header value on the file's first line ("" for an empty file), or the OAuth client
    its JSON object describes."""
    text = Path(path).read_text(encoding="utf-8").strip()
    if not text.startswith("{"):
        return text.splitlines()[0].strip() if text else ""
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AuthorizationError(
            f"{path}: not a JSON object ({exc.msg}, line {exc.lineno})"
        ) from None
    if not isinstance(fields, dict):
        raise AuthorizationError(f"{path}: not a JSON object")
    if fields.get("type") == "service_account":
        return _service_account(fields, path)
    return _client(fields, path)


def _service_account(fields: dict[str, object], path: str) -> ServiceAccount:
    """The service account of a Google key file, or AuthorizationError naming what is
    wrong (never the key)."""
    missing = [
        name
        for name in ("client_email", "private_key", "token_uri")
        if not isinstance(fields.get(name), str) or not fields[name]
    ]
    if missing:
        raise AuthorizationError(f"{path}: a service account key needs {', '.join(missing)}")
    values = {name: str(fields.get(name) or "") for name in fields}
    _check_url(values["token_uri"], "token_uri", path)
    if "PRIVATE KEY-----" not in values["private_key"]:
        raise AuthorizationError(f"{path}: private_key is not a PEM private key")
    return ServiceAccount(
        values["token_uri"],
        values["client_email"],
        values["private_key"],
        values.get("private_key_id", ""),
        values.get("scope") or GOOGLE_SCOPE,
    )


def _check_url(url: str, name: str, path: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AuthorizationError(f"{path}: {name} must be an http:// or https:// URL")


def _client(fields: dict[str, object], path: str) -> ClientCredentials:
    """The OAuth client of a parsed auth file, or AuthorizationError naming what is wrong."""
    unknown = sorted(set(fields) - _FIELDS)
    if unknown:
        raise AuthorizationError(
            f"{path}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(_FIELDS))})"
        )
    for name in _FIELDS:
        if not isinstance(fields.get(name, ""), str):
            raise AuthorizationError(f"{path}: {name} must be a string")
    missing = [n for n in ("token_url", "client_id", "client_secret") if not fields.get(n)]
    if missing:
        raise AuthorizationError(f"{path}: an OAuth client needs {', '.join(missing)}")
    _check_url(str(fields["token_url"]), "token_url", path)
    said = fields.get("client_auth") or "basic"
    if said not in ("basic", "post"):
        raise AuthorizationError(f"{path}: client_auth must be basic or post")
    client_auth: Literal["basic", "post"] = "post" if said == "post" else "basic"
    return ClientCredentials(
        str(fields["token_url"]),
        str(fields["client_id"]),
        str(fields["client_secret"]),
        str(fields.get("scope", "")),
        str(fields.get("audience", "")),
        client_auth,
    )


def _request_token(client: Client, timeout: float, context: ssl.SSLContext | None) -> _Token:
    """Ask the token endpoint for an access token (client credentials or JWT bearer grant)."""
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
    if isinstance(client, ServiceAccount):
        form = {"grant_type": JWT_BEARER, "assertion": _assertion(client)}
    else:
        form = _client_credentials(client, headers)
    body = urllib.parse.urlencode(form).encode("ascii")
    request = urllib.request.Request(client.token_url, data=body, headers=headers)
    https = client.token_url.startswith("https:")
    where = f"OAuth token endpoint {client.token_url}"
    started = time.monotonic()
    try:
        with urllib.request.urlopen(
            request, timeout=timeout, context=context if https else None
        ) as response:
            answer = response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            raise AuthorizationError(f"{where}: HTTP {exc.code}{_refusal(exc.read())}") from None
    except (urllib.error.URLError, HTTPException, OSError) as exc:
        raise AuthorizationError(f"{where}: {getattr(exc, 'reason', None) or exc}") from None
    return _token(answer, started, where)


def _client_credentials(client: ClientCredentials, headers: dict[str, str]) -> dict[str, str]:
    """The form of a client credentials grant (the client's Basic header put in
    ``headers``)."""
    form = {"grant_type": "client_credentials"}
    form.update({k: v for k, v in (("scope", client.scope), ("audience", client.audience)) if v})
    if client.client_auth == "basic":  # RFC 6749 2.3.1: each part form-encoded first
        pair = f"{_encoded(client.client_id)}:{_encoded(client.client_secret)}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    else:
        form.update(client_id=client.client_id, client_secret=client.client_secret)
    return form


def _assertion(account: ServiceAccount) -> str:
    """The service account's signed JWT (RFC 7523 2.1), valid for an hour from now."""
    import jwt

    now = int(time.time())
    claims = {
        "iss": account.client_email,
        "scope": account.scope,
        "aud": account.token_url,
        "iat": now,
        "exp": now + ASSERTION_SECONDS,
    }
    headers = {"kid": account.key_id} if account.key_id else None
    try:
        return jwt.encode(claims, account.private_key, algorithm="RS256", headers=headers)
    except (ValueError, TypeError, jwt.PyJWTError) as exc:  # a key that is no RSA key
        raise AuthorizationError(
            f"the private key of service account {account.client_email} cannot sign "
            f"({type(exc).__name__})"
        ) from None


def _encoded(text: str) -> str:
    return urllib.parse.quote_plus(text, safe="")


def _refusal(body: bytes) -> str:
    """`` (error: description)`` from an OAuth error response (RFC 6749 5.2), else ""."""
    try:
        fields = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(fields, dict) or not isinstance(fields.get("error"), str):
        return ""
    description = fields.get("error_description")
    said = fields["error"] + (f": {description}" if isinstance(description, str) else "")
    return f" ({said[:200]})"


def _token(body: bytes, asked_at: float, where: str) -> _Token:
    """The access token of a token response (RFC 6749 5.1), renewed before ``expires_in``."""
    try:
        fields = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise AuthorizationError(f"{where}: the answer is not JSON") from None
    value = fields.get("access_token") if isinstance(fields, dict) else None
    if not isinstance(value, str) or not value:
        raise AuthorizationError(f"{where}: the answer holds no access_token")
    kind = str(fields.get("token_type", ""))
    if kind.lower() != "bearer":
        raise AuthorizationError(f"{where}: token_type {kind!r}, not Bearer")
    lifetime = fields.get("expires_in")
    if isinstance(lifetime, str) and lifetime.isdigit():
        lifetime = int(lifetime)
    if not isinstance(lifetime, int | float) or isinstance(lifetime, bool) or lifetime <= 0:
        return _Token(value, math.inf)  # until the service refuses it
    return _Token(value, asked_at + lifetime - min(RENEW_BEFORE_SECONDS, lifetime / 2))
