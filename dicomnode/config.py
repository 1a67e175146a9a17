"""The one frozen settings object and how it is loaded.

Precedence, lowest first: built-in defaults < YAML file < ``DICOMNODE_*``
environment variables < CLI flags. Environment variables name nested keys
with a double underscore (``DICOMNODE_NODE__PORT=11113``,
``DICOMNODE_DATABASE__URL=postgresql+psycopg://...``); a value in brackets or
braces is read as YAML (``[PACS, ARCHIVE]``), any other stays text until the
settings convert it to the option's type (``true``, ``2``), so an AE title
``NO`` stays text.

Every option is documented once, here; ``config/dicomnode.yaml`` is the
annotated example. A wrong key or value stops start-up with a
:class:`~dicomnode.errors.ConfigError` naming the key and the reason.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dicomnode.errors import ConfigError
from dicomnode.validation import describe_validation_error, read_yaml_mapping

ENV_PREFIX = "DICOMNODE_"
AE_TITLE_PATTERN = r"^[\x21-\x5b\x5d-\x7e]([\x20-\x5b\x5d-\x7e]{0,14}[\x21-\x5b\x5d-\x7e])?$"
"""1-16 characters of the DICOM default repertoire, no backslash, no leading/trailing space."""
PEER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
AE_TITLE_RULE = "1-16 printable ASCII characters, no backslash, no leading or trailing space"


def checked_ae_title(value: str) -> str:
    """``value`` when it is a valid AE title; else ValueError saying what one is."""
    if not re.fullmatch(AE_TITLE_PATTERN, value):
        raise ValueError(f"AE title {value!r} must be {AE_TITLE_RULE}")
    return value


AeTitle = Annotated[str, AfterValidator(checked_ae_title)]


def check_dicomweb(url: str, auth_file: str, commitment: bool) -> None:
    """A peer's DICOMweb settings, or ValueError saying what is wrong: the base URL is
    http(s)://host[:port][/path], without credentials (they go in the auth file, never in
    the database or the logs), query or fragment; an auth file needs a URL; storage
    commitment (a DIMSE service) needs results sent by C-STORE."""
    if not url:
        if auth_file:
            raise ValueError("dicomweb_auth_file needs a dicomweb URL")
        return
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"dicomweb {url!r} must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("the dicomweb URL must not hold credentials: use dicomweb_auth_file")
    if parts.query or parts.fragment:
        raise ValueError("the dicomweb URL must be the service's base URL, without ? or #")
    try:
        parts.port  # noqa: B018 (raises for a port that is not a number, or out of range)
    except ValueError as exc:
        raise ValueError(f"dicomweb URL: {exc}") from None
    if commitment:
        raise ValueError(
            "commitment (Storage Commitment, a DIMSE service) needs results sent by C-STORE; "
            "this peer receives them by DICOMweb"
        )


def check_address(host: str, port: int, dicomweb: str) -> None:
    """A peer's DICOM address, or ValueError saying what is wrong. A peer has a host and a
    port, except one whose results go by DICOMweb: it may have no DICOM port (``port: 0``,
    a STOW-RS-only archive), and then no host either (it cannot call the node: a registered
    AE title is accepted only from its host)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} must be 1-65535")
    if port == 0 and not dicomweb:
        raise ValueError(
            "port must be 1-65535: a peer without a DICOM port (port 0) needs a dicomweb URL "
            "for its results"
        )
    if port and not host.strip():
        raise ValueError("host must not be empty: it is where the peer's DICOM port is")


UID_ROOT_PATTERN = r"^[1-9][0-9]*(\.(0|[1-9][0-9]*))*\.$"


MAX_PDU_CEILING = 64 << 20
"""Bytes: no PDU longer is read (pynetdicom holds a whole PDU in memory)."""

DEFAULT_MAX_PDU = 1 << 20
"""Bytes the node asks senders to stay under when ``node.max_pdu`` is 0."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NodeSettings(_Section):
    """The node's own application entity."""

    ae_title: AeTitle = Field("DICOMNODE", description="our AE title")
    host: str = Field("0.0.0.0", description="address the SCP listens on")
    port: int = Field(
        11112,
        ge=0,
        le=65535,
        description="port the SCP listens on for plain DICOM; 0 = none, DICOM TLS only (tls.port)",
    )
    allow_unknown_callers: bool = Field(
        False, description="accept associations from calling AEs that are not registered peers"
    )
    check_caller_host: bool = Field(
        True,
        description="a registered peer's AE title is accepted only from the address its host "
        "name resolves to (an AE title alone is easily borrowed); turn off when senders reach "
        "the node through NAT",
    )
    uid_root: str = Field(
        "1.2.826.0.1.3680043.8.498.",
        pattern=UID_ROOT_PATTERN,
        max_length=40,
        description="root of every UID the node creates (ends with a dot); use your organisation's",
    )
    max_pdu: int = Field(
        0,
        ge=0,
        le=MAX_PDU_CEILING,
        description="the largest PDU, in bytes, the node asks senders to stay under (0: 1 MiB); "
        "a PDU declared over 64 MiB is never read",
    )
    network_timeout: float = Field(
        60.0, gt=0, description="seconds of silence before an association is aborted"
    )
    max_associations: int = Field(
        32,
        ge=1,
        le=1024,
        description="associations received at once on each listener (node.port, tls.port); "
        "one more is rejected as transient (local limit exceeded) and its sender retries later",
    )
    check_called_ae: bool = Field(
        True,
        description="an association must call this node's ae_title; one calling another "
        "title (a sender configured for another node) is rejected, and the log says so",
    )
    max_waiting_per_address: int = Field(
        8,
        ge=0,
        le=1024,
        description="connections from one address that may wait at once to send their "
        "association request (10 s from its first byte; a connection that sends nothing is "
        "let go after pynetdicom's 30 s); one more is closed at once, so one host cannot take "
        "every slot of max_associations (0: no bound)",
    )
    institution_name: str = Field(
        "", max_length=64, description="written into result objects when set"
    )


DEFAULT_UMASK = "027"
"""Files 0640 and folders 0750: the service account and its group only (``storage.umask``)."""


class StorageSettings(_Section):
    data_dir: Path = Field(
        Path("var/data"),
        description="received instances and result objects (a relative path is taken from "
        "the working directory at start-up; the database records absolute paths)",
        validate_default=True,
    )
    min_free_mb: int = Field(
        500,
        ge=0,
        description="below this free space (MiB), associations are rejected as transient and "
        "a C-STORE under way gets 0xA700",
    )
    retention_days: float = Field(
        30,
        ge=0,
        description="days after which the pixel data of finished, delivered studies are deleted "
        "(headers and records stay); 0 keeps everything",
    )
    records_days: float = Field(
        0,
        ge=0,
        description="days after which a purged study is forgotten: its headers, SRs and every "
        "record of it deleted (`dicomnode study` no longer knows it; sent again, it is "
        "analysed as new); 0 keeps the records for good. At least retention_days",
    )

    umask: str = Field(
        DEFAULT_UMASK,
        pattern=r"^0?[0-7]{3}$",
        description="octal file-creation mask of the node's commands: the default 027 keeps "
        "received images, results and the SQLite database from other local users (files "
        "0640, folders 0750); 077 hides them from the group too",
    )

    @property
    def umask_bits(self) -> int:
        return int(self.umask, 8)

    @field_validator("umask", mode="before")
    @classmethod
    def _quoted(cls, value: object) -> object:
        if isinstance(value, int):  # YAML reads an unquoted 027 as the number 23
            raise ValueError('write the umask in quotes, e.g. umask: "027"')
        return value

    @field_validator("umask")
    @classmethod
    def _private(cls, value: str) -> str:
        if int(value, 8) & 0o006 != 0o006:
            raise ValueError(
                "other local users must not read or write patient data: end the umask in "
                '6 or 7 (e.g. "027" or "077")'
            )
        return value

    @model_validator(mode="after")
    def _records_outlive_pixels(self) -> StorageSettings:
        if self.records_days and not self.retention_days:
            raise ValueError("records_days needs retention_days: only purged studies are forgotten")
        if self.records_days and self.records_days < self.retention_days:
            raise ValueError(
                f"records_days ({self.records_days:g}) must be at least retention_days "
                f"({self.retention_days:g}): a study's pixel data go first, then its records"
            )
        return self

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        """Absolute, so that every recorded path means one file whatever the reader's
        working directory (a worker host reads the paths a receiving node recorded)."""
        return path.expanduser().absolute()


class DatabaseSettings(_Section):
    url: str = Field(
        "sqlite:///var/dicomnode.db", description="SQLAlchemy URL (SQLite or PostgreSQL)"
    )

    @field_validator("url")
    @classmethod
    def _known_backend(cls, url: str) -> str:
        if not url.startswith(("sqlite:", "postgresql")):
            raise ValueError("only sqlite:/// and postgresql URLs are supported")
        return url


class PeerSettings(_Section):
    """A remote application entity."""

    ae_title: AeTitle
    host: str = Field(
        "",
        description="its host name or address: where its DICOM port is, and the only address "
        "it may call the node from (node.check_caller_host); may be empty for a DICOMweb-only "
        "peer",
    )
    port: int = Field(
        0,
        ge=0,
        le=65535,
        description="its DICOM port; 0: none (a peer whose results go by DICOMweb only)",
    )
    tls: bool = Field(False, description="results are sent to it over DICOM TLS (see tls)")
    commitment: bool = Field(
        False,
        description="after results are delivered to it, ask it to commit to keeping them "
        "(Storage Commitment Push Model); its pixel data are purged only once it has",
    )
    dicomweb: str = Field(
        "",
        description="base URL of its DICOMweb service (https://pacs.example/dicom-web): results "
        "go to it by STOW-RS instead of C-STORE; empty: C-STORE",
    )
    dicomweb_auth_file: str = Field(
        "",
        description="a file holding the HTTP Authorization header value of its DICOMweb "
        "service (`Bearer <token>` or `Basic <base64 of user:password>`), read at each send",
    )

    @model_validator(mode="after")
    def _dicomweb(self) -> PeerSettings:
        check_address(self.host, self.port, self.dicomweb)
        check_dicomweb(self.dicomweb, self.dicomweb_auth_file, self.commitment)
        return self


class TlsSettings(_Section):
    """DICOM TLS: the node's certificate, and the certificate authorities its peers' are
    signed by (both directions verify the other side: mutual authentication)."""

    port: int = Field(0, ge=0, le=65535, description="port of the TLS listener, 0 = none")
    certificate: Path | None = Field(None, description="the node's certificate chain (PEM)")
    private_key: Path | None = Field(None, description="its private key (PEM, unencrypted)")
    ca_certificates: Path | None = Field(
        None, description="the certificate authorities that sign the peers' certificates (PEM)"
    )
    require_client_certificate: bool = Field(
        True, description="a sender must show a certificate signed by ca_certificates"
    )
    check_hostname: bool = Field(
        True, description="a peer's certificate must name the host it is reached at"
    )
    crl_file: Path | None = Field(
        None,
        description="certificate revocation lists (PEM), one for each CA of ca_certificates: "
        "a revoked certificate is refused, a sender's or a peer's",
    )
    expiry_warning_days: int = Field(
        30,
        ge=1,
        description="`dicomnode health` warns this many days before a certificate of "
        "certificate or ca_certificates expires, or the revocation list of crl_file is due",
    )
    peers_call_over_tls: bool = Field(
        True,
        description="a peer registered with tls: true may call only the TLS port: its "
        "associations on the plain port are rejected (its images would cross the network "
        "in the clear)",
    )

    def missing(self) -> list[str]:
        """The files TLS needs that are not given or not there (``tls.KEY (path)``)."""
        files = {
            "certificate": self.certificate,
            "private_key": self.private_key,
            "ca_certificates": self.ca_certificates,
        }
        absent = [
            f"tls.{key}" + ("" if path is None else f" ({path}: no such file)")
            for key, path in files.items()
            if path is None or not path.is_file()
        ]
        if self.crl_file is not None and not self.crl_file.is_file():
            absent.append(f"tls.crl_file ({self.crl_file}: no such file)")
        return absent


class ResultsSettings(_Section):
    destinations: tuple[str, ...] = Field(
        (),
        description="peers that receive results; empty: the calling AE when it is a known peer",
    )
    routes: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description=(
            "per model (its card's name): the peers that receive its results instead of "
            "`destinations`; an empty list sends them nowhere (they stay in the data folder: "
            "a model run in shadow mode)"
        ),
    )
    overlay_max_size: int = Field(
        2048,
        ge=0,
        description="longest side of the radiograph in the overlay (its text band adds rows), "
        "and of the heatmaps behind it, in pixels (0: the original size)",
    )
    overlay_jpeg_quality: int = Field(
        90,
        ge=0,
        le=100,
        description=(
            "JPEG Baseline quality of the overlay Secondary Capture (lossy, flagged as such); "
            "0: uncompressed. Sent uncompressed to a peer that does not accept JPEG Baseline"
        ),
    )

    presentation_state: bool = Field(
        False,
        description=(
            "also send a Grayscale Softcopy Presentation State per image: the result drawn "
            "over the original as graphics the viewer can switch off (text, boxes, the heat "
            "map's outline and peak), beside the overlay and the SR"
        ),
    )

    def receiving_peers(self) -> tuple[str, ...]:
        """Every peer named as a receiver of results, in `destinations` or in `routes`."""
        named = [*self.destinations, *(peer for peers in self.routes.values() for peer in peers)]
        return tuple(dict.fromkeys(named))


class StudySettings(_Section):
    settle_seconds: float = Field(
        2.0,
        ge=0,
        description="quiet seconds after the delivering association is released",
    )


class WorkerSettings(_Section):
    count: int = Field(2, ge=0, le=64, description="worker processes started by `serve`")
    batch_size: int = Field(8, ge=1, le=256, description="images per forward pass")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto picks CUDA when present"
    )
    max_attempts: int = Field(
        3, ge=1, le=100, description="attempts of an inference or report job before it is dead"
    )
    lease_seconds: float = Field(
        30.0, ge=2, description="a job whose worker stops heartbeating is re-run after this"
    )
    poll_seconds: float = Field(0.1, gt=0, le=10, description="idle wait between queue polls")
    threads: int = Field(
        0, ge=0, description="torch threads per worker, 0 = CPU cores / worker count (at least 1)"
    )


class SendSettings(_Section):
    max_attempts: int = Field(
        50,
        ge=1,
        le=100,
        description="C-STORE attempts per object and destination (50 with the default "
        "delays: about 7 hours of retries, so a PACS maintenance window loses nothing)",
    )
    backoff_initial_seconds: float = Field(5.0, gt=0, description="first retry delay")
    backoff_max_seconds: float = Field(600.0, gt=0, description="longest retry delay")
    timeout_seconds: float = Field(30.0, gt=0, description="connection and association time-out")
    response_timeout_seconds: float = Field(
        120.0,
        gt=0,
        description="wait for a C-STORE response (a PACS that archives before it answers "
        "may take long for a large uncompressed overlay)",
    )
    commitment_timeout_seconds: float = Field(
        3600.0,
        gt=0,
        description="how long a peer marked commitment may take to report its storage "
        "commitment before it is asked again (send.max_attempts requests in all)",
    )


class RoutingSettings(_Section):
    """How an instance is matched to a body part (and so to a model)."""

    modalities: tuple[str, ...] = Field(
        ("CR", "DX", "RG", "RF", "XA"), description="radiograph modalities processed"
    )
    body_part_aliases: dict[str, tuple[str, ...]] = Field(
        default_factory=lambda: {
            "HAND": ("HAND", "FINGER", "WRIST", "THUMB"),
            "KNEE": ("KNEE", "PATELLA"),
            "SPINE": (
                "SPINE",
                "CSPINE",
                "TSPINE",
                "LSPINE",
                "SSPINE",
                "C-SPINE",
                "T-SPINE",
                "L-SPINE",
                "CERVICAL SPINE",
                "THORACIC SPINE",
                "LUMBAR SPINE",
                "WHOLE SPINE",
                "SACRUM",
                "COCCYX",
            ),
        },
        description="BodyPartExamined values and description keywords per body part",
    )
    rejection_notes: bool = Field(
        True,
        description="act on rejection notes (IHE IOCM: a Key Object Selection titled Rejected "
        "for Quality Reasons, Rejected for Patient Safety Reasons, Incorrect Modality Worklist "
        "Entry or Data Retention Policy Expired): the images it lists are analysed no more, "
        "left out of the study's report, and what the node made of them is rejected in turn",
    )
    urgent_callers: tuple[str, ...] = Field(
        (),
        description="AE titles whose images are analysed, reported and sent before every "
        "other's (an emergency department's modalities)",
    )
    background_callers: tuple[str, ...] = Field(
        (),
        description="AE titles whose images wait for every other's (a PACS prefetching priors "
        "or migrating an archive)",
    )
    store_priority: bool = Field(
        True,
        description="honour the Priority of the sender's C-STORE request: HIGH before MEDIUM, "
        "LOW after (urgent_callers and background_callers come first)",
    )

    @model_validator(mode="after")
    def _one_priority_per_caller(self) -> RoutingSettings:
        both = sorted(set(self.urgent_callers) & set(self.background_callers))
        if both:
            raise ValueError(
                f"AE title(s) {', '.join(both)} are in both urgent_callers and background_callers"
            )
        return self

    @field_validator("urgent_callers", "background_callers")
    @classmethod
    def _titles(cls, titles: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(t.strip() for t in titles)

    @field_validator("body_part_aliases")
    @classmethod
    def _known_parts(cls, aliases: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        from dicomnode.values import BodyPart

        for key in aliases:
            if key not in BodyPart.__members__:
                raise ValueError(
                    f"unknown body part {key!r}; known: {', '.join(BodyPart.__members__)}"
                )
        return {k: tuple(v.upper() for v in vals) for k, vals in aliases.items()}


class ModelSettings(_Section):
    dir: Path = Field(
        Path("models"), description="folder of model directories (each with model.yaml)"
    )


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(False, alias="json", description="one JSON object per log line")


class MetricsSettings(_Section):
    port: int = Field(
        0, ge=0, le=65535, description="`serve` answers GET /metrics here (Prometheus), 0 = off"
    )
    host: str = Field(
        "127.0.0.1",
        description="address of the metrics listener (0.0.0.0 for a monitoring host elsewhere)",
    )


class AuditSettings(_Section):
    """The audit trail (IHE ATNA): DICOM audit messages (PS3.15 A.5) to an audit record
    repository over syslog, or to a file. Audit messages name the patient (Patient ID) by
    design, as the standard asks: the repository is the place for it, never the log."""

    transport: Literal["off", "udp", "tcp", "tls", "file"] = Field(
        "off",
        description="off; udp (RFC 5426), tcp or tls (RFC 5425, with the node's tls.* "
        "certificate shown and the repository's verified) to audit.host:audit.port; or file "
        "(one syslog line per message appended to audit.file)",
    )
    host: str = Field("", description="the audit record repository's host (udp, tcp, tls)")
    port: int = Field(
        0, ge=0, le=65535, description="its port; 0: 514 for udp and tcp, 6514 for tls"
    )
    file: Path | None = Field(None, description="the file of transport: file")
    source_id: str = Field(
        "", description="AuditSourceID of every message; empty: the node's AE title"
    )
    enterprise_site_id: str = Field(
        "", description="AuditEnterpriseSiteID (the hospital), left out when empty"
    )
    spool_dir: Path | None = Field(
        None,
        description="where each message waits on disk until the repository has it (one "
        "folder per host under it); empty: <storage.data_dir>/audit-spool",
    )
    queue_size: int = Field(
        10000,
        ge=10,
        description="messages held while the repository cannot be reached; beyond it the "
        "oldest is dropped, and the log says how many",
    )

    @field_validator("transport", mode="before")
    @classmethod
    def _unquoted_off(cls, value: object) -> object:
        """``transport: off`` unquoted is YAML's false: it means off."""
        return "off" if value is False else value

    @model_validator(mode="after")
    def _destination_given(self) -> AuditSettings:
        if self.transport == "file" and self.file is None:
            raise ValueError("audit.transport file needs audit.file")
        if self.transport in ("udp", "tcp", "tls") and not self.host:
            raise ValueError(f"audit.transport {self.transport} needs audit.host")
        return self

    @property
    def repository_port(self) -> int:
        return self.port or (6514 if self.transport == "tls" else 514)


class Settings(_Section):
    """All of dicomnode's settings."""

    node: NodeSettings = NodeSettings()
    storage: StorageSettings = Field(default_factory=StorageSettings)
    database: DatabaseSettings = DatabaseSettings()
    peers: dict[str, PeerSettings] = Field(default_factory=dict)
    results: ResultsSettings = ResultsSettings()
    study: StudySettings = StudySettings()
    workers: WorkerSettings = WorkerSettings()
    send: SendSettings = SendSettings()
    routing: RoutingSettings = RoutingSettings()
    models: ModelSettings = ModelSettings()
    logging: LoggingSettings = LoggingSettings()
    tls: TlsSettings = TlsSettings()
    metrics: MetricsSettings = MetricsSettings()
    audit: AuditSettings = AuditSettings()

    @field_validator("peers")
    @classmethod
    def _peer_names(cls, peers: dict[str, PeerSettings]) -> dict[str, PeerSettings]:
        for name in peers:
            if not re.fullmatch(PEER_NAME_PATTERN, name):
                raise ValueError(f"peer name {name!r} must be letters, digits, '_', '.', '-'")
        return peers

    @model_validator(mode="after")
    def _ae_titles_are_distinct(self) -> Settings:
        """Two peers with one AE title, or a peer with the node's: results could go astray."""
        owners: dict[str, str] = {}
        for name, peer in self.peers.items():
            if peer.ae_title == self.node.ae_title:
                raise ValueError(f"peer {name} has the node's own AE title {peer.ae_title!r}")
            if peer.ae_title in owners:
                raise ValueError(
                    f"peers {owners[peer.ae_title]} and {name} have the same AE title "
                    f"{peer.ae_title!r}"
                )
            owners[peer.ae_title] = name
        return self

    @model_validator(mode="after")
    def _tls_has_its_files(self) -> Settings:
        """A TLS listener, a peer reached over TLS, or an audit repository reached over TLS
        needs the certificate files."""
        users = [f"peers.{name}.tls" for name, peer in self.peers.items() if peer.tls]
        if self.tls.port:
            users.insert(0, "tls.port")
        if self.audit.transport == "tls":
            users.append("audit.transport tls")
        missing = self.tls.missing() if users else []
        if missing:
            raise ValueError(f"{users[0]} needs {', '.join(missing)}")
        if self.tls.port and self.tls.port == self.node.port:
            raise ValueError("tls.port must differ from node.port (plain DICOM listens there)")
        if not self.node.port and not self.tls.port:
            raise ValueError(
                "node.port 0 (no plain DICOM listener) needs tls.port: the node would not listen"
            )
        return self

    @property
    def scp_port(self) -> int:
        """The port that names this node and that its health probe calls: ``node.port``, or
        ``tls.port`` on a node that listens for DICOM TLS only (``node.port: 0``)."""
        return self.node.port or self.tls.port

    @model_validator(mode="after")
    def _destinations_are_peers(self) -> Settings:
        unknown = [d for d in self.results.destinations if d not in self.peers]
        if unknown and self.peers:
            # Destinations may also be peers added later with `dicomnode ae add`;
            # only a config that declares peers is checked for typos here.
            raise ValueError(f"results.destinations names unknown peers: {', '.join(unknown)}")
        return self


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML settings file (empty file -> empty mapping)."""
    return read_yaml_mapping(path, "config file", ConfigError)


KUBERNETES_SERVICE_LINK = re.compile(
    r"DICOMNODE_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_(ADDR|PORT|PROTO))?)?)"
)
"""The variables Kubernetes gives every pod for a Service named ``dicomnode`` (not settings)."""


NOT_SETTINGS = frozenset({ENV_PREFIX + "CONFIG", ENV_PREFIX + "BENCH_KNEE_CROPS"})
"""The node's own ``DICOMNODE_*`` variables that are not settings: the settings file, and
the benchmark's knee crops (the bench's node inherits it)."""


def dicomnode_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``DICOMNODE_*`` variables that are settings (not :data:`NOT_SETTINGS`, and not
    the service links Kubernetes adds for a Service named dicomnode)."""
    return {
        name: raw
        for name, raw in environ.items()
        if name.startswith(ENV_PREFIX)
        and name not in NOT_SETTINGS
        and not KUBERNETES_SERVICE_LINK.fullmatch(name)
    }


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Nested overrides from ``DICOMNODE_SECTION__KEY=value`` variables."""
    result: dict[str, Any] = {}
    for name, raw in dicomnode_variables(environ).items():
        parts = [part for part in name[len(ENV_PREFIX) :].split("__") if part]
        # Section and option names are lower case; peer names keep their case (PEERS__PACS__HOST).
        path = [
            p if i == 1 and parts[0].lower() == "peers" else p.lower() for i, p in enumerate(parts)
        ]
        if not path:
            continue
        cursor = result
        for part in path[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[path[-1]] = _env_value(raw)
    return result


def _env_value(raw: str) -> Any:
    """A list or mapping (``[DX, CR]``, ``{...}``) is read as YAML; anything else stays text.

    Text is converted to the setting's type when the settings are validated
    (``"4242"`` to a port, ``"true"`` to a flag), and stays text where text is
    meant: an AE title ``NO`` or ``1234`` is not turned into a flag or a number.
    """
    if raw.strip()[:1] in ("[", "{"):
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError:
            return raw
    return raw


def load_settings(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Load settings: defaults < ``path`` < environment < ``overrides`` (CLI flags)."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    data = _deep_merge(data, env_overrides(environ))
    data = _deep_merge(data, overrides or {})
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        sources = [str(path)] if path else []
        variables = sorted(dicomnode_variables(environ))
        if variables:
            sources.append("environment " + ", ".join(variables))
        source = f" (from {'; '.join(sources)})" if sources else ""
        raise ConfigError(
            f"invalid configuration{source}: {describe_validation_error(exc, '(settings)')}"
        ) from exc
