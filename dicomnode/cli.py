"""The ``dicomnode`` command line (typer + rich). The only place that configures logging."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dicomnode import __version__, logs
from dicomnode.config import DEFAULT_UMASK, Settings, StorageSettings, load_settings
from dicomnode.errors import ConfigError, DicomNodeError
from dicomnode.models.card import MAX_CAM_SHIFT, GradCamSpec

if TYPE_CHECKING:  # the network code loads torch: imported where a command needs it
    from dicomnode.audit.trail import AuditTrail
    from dicomnode.db.session import Database
    from dicomnode.explain.gradcam import Explainer
    from dicomnode.peers import PeerInfo
    from dicomnode.send.resend import Resent
    from dicomnode.training.labelled import Export, LabelSheet, Matched, Shown
    from dicomnode.withdraw import Target, Withdrawn

app = typer.Typer(
    help="dicomnode: an AI node beside your PACS.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
)
ae_app = typer.Typer(help="Known application entities (peers).", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(ae_app, name="ae")
app.add_typer(db_app, name="db")
PIPED_WIDTH = 250
"""Columns of the output when it goes to a file or a pipe (``docker compose exec -T``, cron,
a ticket) and COLUMNS is not set: Rich's 80 cut UIDs and reasons short."""


def _console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    piped = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=PIPED_WIDTH if piped else None)


console = _console()
err = _console(stderr=True)
log = logging.getLogger("dicomnode.cli")

DEFAULT_CONFIG = Path("config/dicomnode.yaml")
LISTED = 50
"""Rows a command lists before it counts the rest (a recall names thousands of studies)."""
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="settings file (default: $DICOMNODE_CONFIG or config/dicomnode.yaml)"
    ),
]


class State:
    config: Path | None = None


def _config_path(explicit: Path | None) -> Path | None:
    if explicit is not None:
        return explicit
    env = os.environ.get("DICOMNODE_CONFIG")
    if env:
        return Path(env)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def settings(config: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    resolved = load_settings(_config_path(config or State.config), overrides=overrides)
    logs.configure(resolved.logging.level, resolved.logging.json_format)
    os.umask(resolved.storage.umask_bits)  # patient data stays the service account's
    return resolved


def keep_private() -> None:
    """What a command that reads patients' images writes (overlays, reports, predictions) is
    not for other local users: the default ``storage.umask`` where no settings are read."""
    os.umask(int(DEFAULT_UMASK, 8))


def _set(target: dict[str, Any], dotted: str, value: Any) -> None:
    if value is None:
        return
    section, _, key = dotted.partition(".")
    target.setdefault(section, {})[key] = value


@app.callback()
def _main(
    config: ConfigOption = None,
    version: Annotated[bool, typer.Option("--version", help="print the version")] = False,
) -> None:
    if version:
        console.print(f"dicomnode {__version__}")
        raise typer.Exit()
    State.config = config


@app.command()
def serve(
    config: ConfigOption = None,
    port: Annotated[int | None, typer.Option(help="SCP port (node.port)")] = None,
    host: Annotated[str | None, typer.Option(help="listen address (node.host)")] = None,
    ae_title: Annotated[
        str | None, typer.Option("--ae-title", help="our AE title (node.ae_title)")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="worker processes (workers.count)")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="storage.data_dir")] = None,
    db_url: Annotated[str | None, typer.Option("--db-url", help="database.url")] = None,
    models_dir: Annotated[Path | None, typer.Option("--models-dir", help="models.dir")] = None,
    device: Annotated[str | None, typer.Option(help="workers.device: auto, cpu or cuda")] = None,
) -> None:
    """Run the SCP, the study scheduler and the worker processes."""
    from dicomnode.service import serve as run

    overrides: dict[str, Any] = {}
    for dotted, value in (
        ("node.port", port),
        ("node.host", host),
        ("node.ae_title", ae_title),
        ("workers.count", workers),
        ("storage.data_dir", data_dir),
        ("database.url", db_url),
        ("models.dir", models_dir),
        ("workers.device", device),
    ):
        _set(overrides, dotted, value)
    run(settings(config, overrides))


@app.command()
def worker(
    config: ConfigOption = None,
    count: Annotated[
        int | None, typer.Option(help="worker processes (default workers.count)")
    ] = None,
    device: Annotated[str | None, typer.Option(help="workers.device: auto, cpu or cuda")] = None,
) -> None:
    """Run workers only (for example on a GPU host sharing the PostgreSQL database)."""
    from dicomnode.service import serve as run

    overrides: dict[str, Any] = {}
    _set(overrides, "workers.device", device)
    resolved = settings(config, overrides)
    run(
        resolved,
        with_scp=False,
        workers=count if count is not None else max(1, resolved.workers.count),
    )


@app.command()
def echo(peer: str, config: ConfigOption = None) -> None:
    """C-ECHO a known peer (as the configuration file declares it, else as registered); a
    DICOMweb peer's service is asked for one study too (QIDO-RS, with its token)."""
    from dicomnode.peers import PeerInfo, get_peer
    from dicomnode.send.scu import echo as c_echo
    from dicomnode.tls import client_context

    resolved = settings(config)
    if peer in resolved.peers:
        info = PeerInfo.from_settings(peer, resolved.peers[peer])
    else:
        with _database(resolved).session() as session:
            info = get_peer(session, peer)
    failed = False
    if info.port:
        answer = c_echo(
            info,
            calling_ae=resolved.node.ae_title,
            timeout=resolved.send.timeout_seconds,
            tls=client_context(resolved.tls) if info.tls else None,
        )
        where = f"{peer} ({info.address}{', TLS' if info.tls else ''})"
        failed = answer.status != 0
        if answer.status is None:
            err.print(f"[red]{escape(f'C-ECHO {where}: {answer.reason}')}[/red]")
        else:
            console.print(f"C-ECHO {where}: status 0x{answer.status:04X}")
    else:
        console.print(f"{peer} has no DICOM port: no C-ECHO (its results go by DICOMweb)")
    if info.dicomweb:
        failed = not _dicomweb_answers(resolved, info) or failed
    if failed:
        raise typer.Exit(1)


def _dicomweb_answers(resolved: Settings, peer: PeerInfo) -> bool:
    """Whether the peer's DICOMweb service answers a QIDO-RS request with 2xx (said either
    way): its URL, the token of its auth file and its certificate work."""
    from dicomnode.send.stow import check_service, studies_url
    from dicomnode.tls import https_context

    https = peer.dicomweb.startswith("https:")
    context = https_context(resolved.tls) if https else None
    status, reason = check_service(peer, timeout=resolved.send.timeout_seconds, context=context)
    said = f"DICOMweb {studies_url(peer)}: " + (reason if status is None else f"HTTP {status}")
    if status == 405:  # a STOW-RS-only service: the URL answers, it takes no query
        console.print(
            f"{said}: the service takes no QIDO-RS query, so its token and its STOW-RS "
            "answer are first checked by a send (`dicomnode status` shows it)"
        )
        return True
    if status is None or not 200 <= status < 300:
        err.print(f"[red]{escape(said)}[/red]")
        return False
    console.print(said)
    return True


def _database(resolved: Settings):  # type: ignore[no-untyped-def]
    """The node's database. The configuration file's peers are written into it by
    ``serve`` (the receiving node) only: hosts that share the database (workers, an
    administrator's shell) may hold other configuration files."""
    from dicomnode.service import open_database

    return open_database(resolved)


@ae_app.command("add")
def ae_add(
    name: str,
    ae_title: Annotated[str, typer.Option("--ae-title", help="the peer's AE title")],
    host: Annotated[
        str,
        typer.Option(
            help="host name or address (of its DICOM port, and the one it may call from); "
            "may be left out for a DICOMweb-only peer"
        ),
    ] = "",
    port: Annotated[
        int, typer.Option(help="its DICOM port; left out or 0: none (a DICOMweb-only peer)")
    ] = 0,
    tls: Annotated[bool, typer.Option("--tls", help="send to it over DICOM TLS")] = False,
    commitment: Annotated[
        bool,
        typer.Option(
            "--commitment", help="ask it to commit to keeping the results delivered to it"
        ),
    ] = False,
    dicomweb: Annotated[str, typer.Option("--dicomweb", help=DICOMWEB_HELP)] = "",
    dicomweb_auth_file: Annotated[
        str, typer.Option("--dicomweb-auth-file", help=DICOMWEB_AUTH_HELP)
    ] = "",
    config: ConfigOption = None,
) -> None:
    """Register a peer (a running node accepts it at once)."""
    from dicomnode.peers import PeerInfo, add_peer

    resolved = settings(config)
    _check_tls_files(resolved, tls)
    db = _database(resolved)
    peer = PeerInfo(
        name,
        ae_title,
        host,
        port,
        tls=tls,
        commitment=commitment,
        dicomweb=dicomweb,
        dicomweb_auth_file=dicomweb_auth_file,
    )
    with db.session() as session:
        add_peer(session, peer)
    said = f"added peer {name}: {peer.address}{_peer_notes(peer)}"
    _audit_peers(resolved, said)
    console.print(said)


DICOMWEB_HELP = (
    "base URL of its DICOMweb service (https://host/dicom-web): results go by STOW-RS "
    "instead of C-STORE"
)
DICOMWEB_AUTH_HELP = (
    "a file holding the Authorization header value of its DICOMweb service (Bearer <token> "
    "or Basic <base64>), read at each send"
)


def _peer_notes(peer: PeerInfo) -> str:
    shown = (
        ("TLS", peer.tls),
        ("storage commitment", peer.commitment),
        (f"results by STOW-RS to {peer.dicomweb}", bool(peer.dicomweb)),
    )
    notes = [note for note, on in shown if on]
    return f" ({', '.join(notes)})" if notes else ""


def _check_tls_files(resolved: Settings, tls: bool | None) -> None:
    """A peer reached over TLS needs the node's certificate files (``tls.*``)."""
    missing = resolved.tls.missing() if tls else []
    if missing:
        raise ConfigError(f"--tls needs {', '.join(missing)} in the configuration")


@ae_app.command("update")
def ae_update(
    name: str,
    ae_title: Annotated[str | None, typer.Option("--ae-title")] = None,
    host: Annotated[str | None, typer.Option(help='host name or address ("": none)')] = None,
    port: Annotated[
        int | None, typer.Option(help="its DICOM port (0: none, for a DICOMweb-only peer)")
    ] = None,
    tls: Annotated[
        bool | None, typer.Option("--tls/--no-tls", help="send over DICOM TLS, or not")
    ] = None,
    commitment: Annotated[
        bool | None,
        typer.Option("--commitment/--no-commitment", help="ask for storage commitment, or not"),
    ] = None,
    dicomweb: Annotated[
        str | None, typer.Option("--dicomweb", help=DICOMWEB_HELP + ' ("": C-STORE again)')
    ] = None,
    dicomweb_auth_file: Annotated[
        str | None, typer.Option("--dicomweb-auth-file", help=DICOMWEB_AUTH_HELP)
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Change a peer."""
    from dicomnode.peers import update_peer

    resolved = settings(config)
    _check_tls_files(resolved, tls)
    db = _database(resolved)
    with db.session() as session:
        new = update_peer(
            session,
            name,
            ae_title=ae_title,
            host=host,
            port=port,
            tls=tls,
            commitment=commitment,
            dicomweb=dicomweb,
            dicomweb_auth_file=dicomweb_auth_file,
        )
    suffix = _peer_notes(new)
    said = f"updated peer {name}: {new.address}{suffix}"
    _audit_peers(resolved, said)
    console.print(said)


@ae_app.command("remove")
def ae_remove(name: str, config: ConfigOption = None) -> None:
    """Remove a peer."""
    from dicomnode.peers import remove_peer

    resolved = settings(config)
    db = _database(resolved)
    with db.session() as session:
        remove_peer(session, name, resolved.results.receiving_peers())
    _audit_peers(resolved, f"removed peer {name}")
    console.print(f"removed peer {name}")


def _audit_peers(resolved: Settings, change: str) -> None:
    """A Security Alert (Network Configuration) for a peer changed, written before the
    command ends."""
    from dicomnode.audit.events import peers_changed

    with _audit_trail(resolved) as audit:
        audit.record(peers_changed(resolved.node.ae_title, change=change))


@contextlib.contextmanager
def _audit_trail(resolved: Settings) -> Iterator[AuditTrail]:
    """The audit trail of one command, its messages written (up to 5 s) before it ends."""
    from dicomnode.audit.trail import AuditTrail

    audit = AuditTrail.from_settings(resolved)
    try:
        yield audit
    finally:
        audit.close()


@ae_app.command("list")
def ae_list(config: ConfigOption = None) -> None:
    """List peers: those registered, and the configuration file's that `serve` has not
    registered yet (nothing is written)."""
    from dicomnode.peers import PeerInfo, list_peers

    resolved = settings(config)
    db = _database(resolved)
    table = Table("name", "AE title", "host", "port", "TLS", "commitment", "results by", "source")
    with db.session() as session:
        registered = list_peers(session)
    names = {peer.name for peer in registered}
    waiting = [
        PeerInfo.from_settings(name, p, "config (registered when serve starts)")
        for name, p in resolved.peers.items()
        if name not in names
    ]
    for peer in sorted([*registered, *waiting], key=lambda peer: peer.name):
        tls, commits = ("yes" if on else "no" for on in (peer.tls, peer.commitment))
        by = f"STOW-RS {peer.dicomweb}" if peer.dicomweb else "C-STORE"
        port = str(peer.port) if peer.port else "none"
        table.add_row(
            peer.name, peer.ae_title, peer.host or "-", port, tls, commits, by, peer.source
        )
    console.print(table)


@app.command()
def models(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON list, for scripts")] = False,
) -> None:
    """The model versions installed (models.dir) and those that reported here before: body
    parts, training data, weights checksum, and the analysis rounds each opened. A version
    no longer installed can still report its studies again (a rejection note): the node kept
    its card."""
    from dataclasses import asdict

    from dicomnode.cards import model_versions
    from dicomnode.service import load_registry

    resolved = settings(config)
    registry = load_registry(resolved)
    with _database(resolved).reading() as session:
        versions = model_versions(session, registry)
    if as_json:
        typer.echo(json.dumps([asdict(v) for v in versions], default=_iso, indent=1))
        return
    table = Table(
        "name",
        "version",
        "body parts",
        "installed",
        "training data",
        "weights",
        "rounds",
        "last round (UTC)",
    )
    for v in versions:
        table.add_row(
            v.name,
            v.version,
            ", ".join(v.body_parts) or "-",
            escape(v.installed) or "no (card kept)",
            "synthetic" if v.synthetic_training_data else "real",
            v.sha256[:12],
            str(v.rounds),
            v.last_round.strftime("%Y-%m-%d %H:%M") if v.last_round else "-",
        )
    console.print(table)


@app.command()
def status(
    config: ConfigOption = None,
    limit: Annotated[int, typer.Option(help="studies, and skipped instances, to show")] = 10,
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON object, for scripts and monitoring")
    ] = False,
) -> None:
    """Recent studies, job counts by state, dead jobs and skipped instances with reasons."""
    from dataclasses import asdict

    from dicomnode.status import audit_state, node_status, render_status
    from dicomnode.tls import tls_state

    resolved = settings(config)
    db = _database(resolved)
    with db.reading() as session:
        state = node_status(
            session,
            limit,
            resolved.storage,
            resolved.results,
            audit_state(resolved),
            tls_state(resolved.tls),
        )
    if as_json:
        typer.echo(json.dumps(asdict(state), default=_iso, indent=1))
        return
    for table in render_status(state):
        console.print(table)


def _iso(value: object) -> str:
    """JSON for what ``json`` cannot write: times in ISO 8601 with their UTC offset (the
    database's times are UTC, held without a zone), the rest as text."""
    if isinstance(value, datetime.datetime):
        zoned = value if value.tzinfo is not None else value.replace(tzinfo=datetime.UTC)
        return zoned.isoformat()
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


@app.command()
def study(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID")],
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object, for scripts")] = False,
    config: ConfigOption = None,
) -> None:
    """One study's path through the node, from who sent it to where its results went.

    Who sent which images when, what became of each, the analysis rounds and findings, and
    where each result went (delivered, retrying and why, or dead). Exit status 1 when the
    node holds no record of the study."""
    from dataclasses import asdict

    from dicomnode.cards import kept_class_names
    from dicomnode.history import class_names, render_history, study_history

    resolved = settings(config)
    db = _database(resolved)
    with db.reading() as session:
        names = kept_class_names(session) | class_names(Path(resolved.models.dir))
        history = study_history(session, study_uid.strip(), names)
    if history is None:
        err.print(f"the node holds no record of study {escape(study_uid)}")
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(asdict(history), default=_iso, indent=1))
        return
    for table in render_history(history):
        console.print(table)


@app.command()
def health(
    config: ConfigOption = None,
    scp: Annotated[
        bool, typer.Option("--scp/--no-scp", help="probe the DICOM listener (not on worker hosts)")
    ] = True,
    stalled_minutes: Annotated[
        float, typer.Option(help="a queue where nothing moved this long while jobs wait fails")
    ] = 10,
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON object, for scripts and monitoring")
    ] = False,
) -> None:
    """Check the database, the DICOM listener, free space and that jobs are being run.

    Exit status 1 when a check fails (for a container's health check or monitoring)."""
    from dataclasses import asdict

    from dicomnode.health import run_checks

    checks = run_checks(settings(config), scp=scp, stalled_minutes=stalled_minutes)
    healthy = all(check.ok for check in checks)
    if as_json:
        typer.echo(json.dumps({"ok": healthy, "checks": [asdict(c) for c in checks]}, indent=1))
    else:
        for check in checks:
            mark = "ok  " if check.ok else "FAIL"
            line = f"{mark} {check.name}: {check.detail}"
            console.print(line, soft_wrap=True, highlight=False, markup=False)
    if not healthy:
        raise typer.Exit(1)


@app.command()
def metrics(
    config: ConfigOption = None,
    out: Annotated[
        Path | None,
        typer.Option(help="write to this file (replaced whole: node_exporter's textfile *.prom)"),
    ] = None,
) -> None:
    """Print the node's Prometheus metrics (what `serve` answers at /metrics with metrics.port).

    Exit status 1 when the database cannot be read (the text then says dicomnode_database_up 0)."""
    from dicomnode.db.session import Database
    from dicomnode.metrics import exposition

    resolved = settings(config)
    database = Database(resolved.database.url)  # unchecked: a database that is down is a figure
    try:
        text, database_up = exposition(database, resolved)
    finally:
        database.dispose()
    if out is None:
        sys.stdout.buffer.write(text)
    else:
        partial = out.with_name(f".{out.name}.partial")  # not *.prom: node_exporter skips it
        partial.write_bytes(text)
        os.replace(partial, out)
    if not database_up:
        raise typer.Exit(1)


@app.command()
def retry(
    job: Annotated[
        list[int] | None, typer.Option("--job", help="job id (repeatable); default: all dead jobs")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Re-queue dead jobs with fresh attempts (an image's analysis gets a new report)."""
    from dicomnode.studies import retry_dead_jobs

    db = _database(settings(config))
    with db.session() as session:
        count = retry_dead_jobs(session, job or None)
    console.print(f"re-queued {count} job(s)")
    _warn_not_dead(job, count)


def _warn_not_dead(job_ids: list[int] | None, count: int) -> None:
    """Say how many of the job ids given were not dead jobs (nothing was done to them)."""
    if job_ids and count < len(set(job_ids)):
        err.print(
            f"[yellow]{len(set(job_ids)) - count} of the given job ids are not dead jobs[/yellow]"
        )


@app.command()
def withdraw(
    study: Annotated[
        list[str] | None,
        typer.Argument(
            help="Study Instance UID(s); none: every study that --model --version reported"
        ),
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="only this model's results")] = None,
    version: Annotated[
        str | None, typer.Option("--version", help="only this version's results")
    ] = None,
    title: Annotated[
        str,
        typer.Option(
            "--title",
            help="the note's title: quality (113001), safety (113037), worklist (113038) "
            "or retention (113039)",
        ),
    ] = "quality",
    reason: Annotated[
        str,
        typer.Option(
            "--reason", help="why, for the note's Key Object Description (it goes to the PACS)"
        ),
    ] = "",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="list what would be withdrawn, change nothing")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
    config: ConfigOption = None,
) -> None:
    """Withdraw the node's results of studies from the PACS (a model version recalled, a
    study outside its model's intended use): a rejection note (IHE IOCM) lists the overlays,
    presentation states and SRs sent, and goes where they went; an archive that supports
    IOCM hides them. Without a study: every study that --model --version reported (a
    recall). Exit status 1 when nothing could be withdrawn."""
    from dicomnode.withdraw import TITLES, WithdrawError, targets, withdraw_in_batches

    if title not in TITLES:
        raise typer.BadParameter(f"use one of {', '.join(TITLES)}", param_hint="--title")
    if not study and not (model and version):
        raise typer.BadParameter(
            "name the studies, or --model and --version to withdraw every study they reported",
            param_hint="STUDY",
        )
    resolved = settings(config)
    db = _database(resolved)
    with db.reading() as session:  # no write lock while the administrator reads the list
        found = targets(session, study or [], model, version)
    if not found:
        err.print("nothing to withdraw: no result of these studies was sent")
        raise typer.Exit(1)
    _list_targets(found)
    if dry_run:
        return
    if not (yes or typer.confirm(f"Withdraw the results of {len(found)} study(ies)?")):
        raise typer.Exit(1)
    with _audit_trail(resolved) as audit:
        try:
            done = withdraw_in_batches(
                db, found, TITLES[title], reason, resolved, lambda made: _audit(audit, made)
            )
        except WithdrawError as exc:
            err.print(f"[red]{escape(str(exc))}[/red]")
            raise typer.Exit(1) from None
    console.print(
        f"{len(done.made)} withdrawal(s) queued: the node sends each rejection note once its "
        "earlier sends are done (`dicomnode study` shows them)"
    )
    if done.late:
        err.print(
            f"[yellow]{len(done.late)} study(ies) began an analysis meanwhile, e.g. "
            f"{done.late[0]}: run the command again once they are reported[/yellow]"
        )
        raise typer.Exit(1)


def _list_targets(found: list[Target]) -> None:
    """The table of what a withdrawal lists (the first :data:`LISTED` rows, then a count)."""
    table = Table("study", "model", "result objects sent", "state")
    for t in found[:LISTED]:
        state = "being analysed: withdraw once reported" if t.busy else "to withdraw"
        table.add_row(t.study_instance_uid, f"{t.model_name} {t.model_version}", str(t.sent), state)
    console.print(table)
    if len(found) > LISTED:
        busy = sum(t.busy for t in found)
        console.print(
            f"… and {len(found) - LISTED} more: {len(found)} study(ies) and model versions, "
            f"{sum(t.sent for t in found)} result objects, {busy} being analysed"
        )


def _audit(audit: AuditTrail, made: list[Withdrawn]) -> None:
    """The audit trail's record of an operator's withdrawal, one message per study and model
    version (written once each batch is committed)."""
    from dicomnode.audit.objects import record_withdrawn

    for withdrawn in made:
        record_withdrawn(audit, map(Path, withdrawn.target.paths), withdrawn.description)


@app.command()
def resend(
    study: Annotated[list[str], typer.Argument(help="Study Instance UID(s)")],
    to: Annotated[str, typer.Option("--to", help="the peer (its name, as `ae list` shows)")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="say what would be sent, change nothing")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Send a study's results (overlays and SRs) to a peer again: the PACS lost them, or a
    new archive should hold them. Exit status 1 when a study could not be."""
    from dicomnode.send.resend import ResendRefusedError

    resolved = settings(config)
    db = _database(resolved)
    refused = 0
    with _audit_trail(resolved) as audit:
        for study_uid in study:
            try:
                resent = _resend_one(db, resolved, audit, study_uid, to, dry_run)
            except ResendRefusedError as exc:
                err.print(f"[red]{escape(str(exc))}[/red]")
                refused += 1
                continue
            _say_resent(resent, study_uid)
    if refused:
        raise typer.Exit(1)


def _resend_one(
    db: Database, resolved: Settings, audit: AuditTrail, study_uid: str, to: str, dry_run: bool
) -> Resent:
    """Queue one study's results to ``to`` again, audited as ordered by the operator."""
    from dicomnode.audit.objects import record_ordered
    from dicomnode.peers import destination_host, get_peer
    from dicomnode.send.resend import resend_study

    with db.session() as session:
        resent = resend_study(
            session, study_uid, to, max_attempts=resolved.send.max_attempts, dry_run=dry_run
        )
        peer = get_peer(session, resent.peer)
    if not dry_run and resent.queued:
        record_ordered(audit, peer.ae_title, destination_host(peer), resent.paths)
        log.info("resend of study=%s to %s: %d object(s)", study_uid, to, resent.queued)
    return resent


def _say_resent(resent: Resent, study_uid: str) -> None:
    verb = "would queue" if resent.dry_run else "queued"
    notes = [f"{resent.on_their_way} on their way already"] if resent.on_their_way else []
    if resent.kept_rounds:
        notes.append(f"{resent.kept_rounds} round(s) kept here (shadow mode) not sent")
    console.print(
        f"{verb} {resent.queued} result object(s) of study {study_uid} to {resent.peer}"
        + (f" ({'; '.join(notes)})" if notes else "")
    )


@app.command()
def discard(
    job: Annotated[list[int] | None, typer.Option("--job", help="dead job id (repeatable)")] = None,
    all_dead: Annotated[
        bool, typer.Option("--all-dead", help="every dead job (instead of --job)")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Give up dead jobs, so that their studies can be finished and purged."""
    from dicomnode.studies import discard_dead_jobs

    if bool(job) == all_dead:
        err.print("[red]name the dead jobs with --job ID (repeatable), or give --all-dead[/red]")
        raise typer.Exit(2)
    db = _database(settings(config))
    with db.session() as session:
        count = discard_dead_jobs(session, job or None)
    console.print(f"discarded {count} job(s)")
    _warn_not_dead(job, count)


@app.command()
def purge(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="list what would be purged, change nothing")
    ] = False,
    older_than_days: Annotated[
        float | None,
        typer.Option(help="instead of storage.retention_days (the node purges hourly by that)"),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Delete the pixel data of finished, delivered studies older than the retention period,
    and (with storage.records_days) forget purged studies older than that."""
    from dicomnode.retention import purge_expired

    resolved = settings(config)
    days = resolved.storage.retention_days if older_than_days is None else older_than_days
    if days <= 0:
        console.print("retention is off (0 days): nothing is purged")
        return
    db = _database(resolved)
    with _audit_trail(resolved) as audit:  # one trail: purged and forgotten studies
        summary = purge_expired(db, days, dry_run=dry_run, audit=audit)
        verb = "would purge" if dry_run else "purged"
        console.print(
            f"{verb} {len(summary.studies)} study(ies) older than {days:g} days: "
            f"{summary.files} file(s), {summary.bytes_freed / 1e6:.1f} MB"
        )
        for study_uid in summary.studies:
            console.print(f"  {study_uid}")
        _forget_expired_records(db, resolved.storage, audit, dry_run)


def _forget_expired_records(
    db: Database, storage: StorageSettings, audit: AuditTrail, dry_run: bool
) -> None:
    """The records part of ``purge``: what ``storage.records_days`` forgets."""
    from dicomnode.retention import forget_expired

    if storage.records_days <= 0:
        console.print("records are kept for good (storage.records_days is 0)")
        return
    summary = forget_expired(
        db, storage.records_days, storage.data_dir, dry_run=dry_run, audit=audit
    )
    verb = "would forget" if dry_run else "forgot"
    console.print(
        f"{verb} {len(summary.studies)} purged study(ies) older than "
        f"{storage.records_days:g} days: {summary.files} file(s), and "
        f"{summary.associations} association record(s) that delivered nothing still held"
    )
    for study_uid in summary.studies:
        console.print(f"  {study_uid}")
    _fail_on_left(summary.left)


def _fail_on_left(left: Sequence[Path]) -> None:
    """Name the files a deletion left (they hold patient data) and exit 1; nothing if none."""
    if left:
        err.print(f"[red]{len(left)} file(s) could not be deleted; remove them by hand:[/red]")
        for path in left:
            err.print(f"  {escape(str(path))}")
        raise typer.Exit(1)


@app.command()
def forget(
    study: Annotated[list[str], typer.Argument(help="Study Instance UID(s)")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="list what would be deleted, change nothing")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
    config: ConfigOption = None,
) -> None:
    """Delete studies outright: their images, results and records (an erasure request, or
    a study sent to the node by mistake). The PACS keeps its own copies, of the node's
    results too: `dicomnode withdraw` them first to have them hidden there."""
    resolved = settings(config)
    db = _database(resolved)
    if not (dry_run or yes or typer.confirm(f"Delete {len(study)} study(ies) for good?")):
        raise typer.Exit(1)
    left: list[Path] = []
    with _audit_trail(resolved) as audit:
        for study_uid in study:
            left += _forget_one(db, resolved, audit, study_uid, dry_run)
    _fail_on_left(left)


def _forget_one(
    db: Database, resolved: Settings, audit: AuditTrail, study_uid: str, dry_run: bool
) -> list[Path]:
    """Forget one study (``forget``); the files that could not be deleted."""
    from dicomnode.audit.objects import record_deleted
    from dicomnode.retention import FORGET_REASON, forget_study, remove_files

    left: list[Path] = []
    with db.session() as session:
        forgotten = forget_study(session, study_uid, dry_run=dry_run)
    if not dry_run:
        record_deleted(audit, forgotten.files, by_operator=True, reason=FORGET_REASON)
        left = remove_files(Path(resolved.storage.data_dir), forgotten.files)
        log.info(
            "forgot study=%s: %d instance(s), %d output(s)",
            study_uid,
            forgotten.instances,
            forgotten.outputs,
        )
    verb = "would delete" if dry_run else "deleted"
    console.print(
        f"{verb} study {study_uid}: {forgotten.instances} instance(s), "
        f"{forgotten.outputs} result object(s), {len(forgotten.files)} file(s)"
    )
    return left


@app.command()
def predict(
    files: Annotated[list[Path], typer.Argument(help="DICOM files")],
    out: Annotated[Path, typer.Option("--out", help="output folder for SC and SR files")],
    config: ConfigOption = None,
    models_dir: Annotated[Path | None, typer.Option("--models-dir")] = None,
    device: Annotated[str | None, typer.Option(help="workers.device: auto, cpu or cuda")] = None,
) -> None:
    """Run the node's pipeline on files (no network, no database): writes SC and SR files.

    Exits 1 when an input could not be read or processed, so that a script sees it;
    images that the node's routing skips (not a radiograph, no model) are not failures.
    """
    from dicomnode.offline import predict_files

    overrides: dict[str, Any] = {}
    _set(overrides, "models.dir", models_dir)
    _set(overrides, "workers.device", device)
    written = predict_files(settings(config, overrides), files, out)
    table = Table("input", "outcome", "output")
    for row in written:
        table.add_row(escape(row.input), escape(row.outcome), escape(row.output))
    console.print(table)
    failed = sum(row.failed for row in written)
    console.print(f"{failed} of {len(files)} input(s) failed")
    if failed:
        raise typer.Exit(1)


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Create the database or bring it to the current schema."""
    from dicomnode.db.migrate import upgrade

    resolved = settings(config)
    upgrade(resolved.database.url)
    console.print("database is at the current schema")


@db_app.command("backup")
def db_backup(
    target: Annotated[
        Path,
        typer.Argument(
            metavar="FILE|FOLDER",
            help="the new backup file, or a folder to write dicomnode-<UTC time>.db into",
        ),
    ],
    keep: Annotated[
        int | None,
        typer.Option(help="into a folder: then keep only the newest N of its backups"),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Copy the SQLite database to a new file, consistently, while the node runs (restore:
    stop the node, put the copy in the database's place, start it). PostgreSQL: `pg_dump`."""
    from dicomnode.store.backup import backup_database, backup_into

    resolved = settings(config)
    if target.is_dir():
        done, deleted = backup_into(resolved.database.url, target, keep)
    elif keep is not None:
        raise ConfigError(f"--keep needs a folder to back up into; {target} is not one")
    else:
        done, deleted = backup_database(resolved.database.url, target), []
    console.print(
        f"backed up {done.source} to {done.target}: {done.size_bytes / 1e6:.1f} MB, "
        f"schema revision {done.schema_revision}, integrity ok"
    )
    for path in deleted:
        console.print(f"deleted the older backup {path.name} (--keep {keep})")


@app.command()
def train(
    config_file: Annotated[Path, typer.Argument(metavar="CONFIG.yaml", help="training recipe")],
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from the last checkpoint")
    ] = False,
    fold: Annotated[
        str | None,
        typer.Option("--fold", help="override the recipe's fold: an index, all, none or final"),
    ] = None,
    output_dir: Annotated[
        Path | None,
        typer.Option("--output-dir", help="override the recipe's output_dir"),
    ] = None,
    version: Annotated[
        str | None,
        typer.Option(
            "--version",
            help="override the recipe's model.version; its checkpoints go to a sub-folder "
            "named VERSION (a new run refuses to write where its model's name and version are)",
        ),
    ] = None,
    init_weights: Annotated[
        str | None,
        typer.Option(
            "--init-weights",
            help="override the recipe's init_weights: to cross-validate a staged recipe, start "
            "fold K from the previous stage's fold-K model (refused when the weights trained on "
            "a fold this run holds out)",
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option("--threads", min=1, help="override the recipe's num_threads (CPU threads)"),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            "--precision", help="override the recipe's precision: auto, float32 or bfloat16"
        ),
    ] = None,
) -> None:
    """Train a model from a recipe; writes a model directory the node can serve."""
    from dicomnode.models.card import load_card
    from dicomnode.training.report import training_rows
    from dicomnode.training.train import train_from_config

    logs.configure()
    out = train_from_config(
        config_file,
        resume=resume,
        fold=fold,
        output_dir=output_dir,
        version=version,
        init_weights=init_weights,
        threads=threads,
        precision=precision,
    )
    card = load_card(out)
    scalars, per_class = training_rows(card.metrics)
    over = "folds, mean ± sd" if "cross_validation" in card.metrics else "held-out fold"
    figures = Table("figure", f"value ({over})")
    for row in scalars:
        figures.add_row(*row)
    classes = Table("class", "precision", "recall", "F1", "AUC (one vs rest)")
    for index, *values in per_class:
        classes.add_row(card.classes[int(index)].name, *values)
    console.print(figures, classes)
    console.print(f"model written to {out}: {card.name} {card.version}")


@app.command()
def pretrained(
    architectures: Annotated[
        list[str] | None,
        typer.Argument(metavar="[ARCHITECTURE]...", help="default: all with ImageNet weights"),
    ] = None,
) -> None:
    """Where `init_weights: imagenet` finds each architecture's weights (nothing is downloaded)."""
    from dicomnode.models.architectures import TRAINABLE
    from dicomnode.training.pretrained import has_imagenet, imagenet_candidates

    names = architectures or [a for a in TRAINABLE if has_imagenet(a)]
    for name in names:
        if not has_imagenet(name):
            raise ConfigError(f"architecture {name!r} has no ImageNet weights")
        candidates = imagenet_candidates(name)
        found = next((c.path for c in candidates if c.path is not None), None)
        console.print(f"{name}: {found or 'missing'}", soft_wrap=True, highlight=False)
        for candidate in candidates:
            line = f"found: {candidate.path}" if candidate.path else f"looked in: {candidate.where}"
            console.print(f"  {line}", soft_wrap=True, highlight=False)


@app.command("train-localiser")
def train_localiser(
    data_dir: Annotated[
        Path, typer.Argument(help="joint crops: `DATA_DIR/<class>/<patient><L|R>.<ext>`")
    ],
    out: Annotated[Path, typer.Option("--out", help="safetensors file to write")],
    steps: Annotated[int, typer.Option(help="optimiser steps (16 composites each)")] = 1000,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    threads: Annotated[
        int, typer.Option(help="torch threads (1 is fastest on 2 shared cores)")
    ] = 1,
) -> None:
    """Train the knee-joint localiser on composites built from joint crops."""
    from dicomnode.models.card import sha256_of
    from dicomnode.training.localiser import train_localiser as run

    logs.configure()
    path = run(data_dir, out, steps=steps, seed=seed, threads=threads)
    console.print(f"localiser written to {path} (sha256 {sha256_of(path)})")


@app.command("attach-localiser")
def attach_localiser(
    model_dir: Path,
    weights: Annotated[Path, typer.Argument(help="localiser safetensors from train-localiser")],
    threshold: Annotated[
        float, typer.Option(help="peak height below which a joint is uncertain")
    ] = 0.5,
    intended_use: Annotated[str, typer.Option(help="new intended-use text for the card")] = "",
) -> None:
    """Ship a knee localiser with a model directory (copies it and updates model.yaml)."""
    from dicomnode.training.localiser import attach_localiser as attach

    logs.configure()
    console.print(
        f"updated {attach(model_dir, weights, threshold=threshold, intended_use=intended_use)}"
    )


@app.command()
def ensemble(
    out: Annotated[Path, typer.Argument(help="ensemble model directory to write")],
    members: Annotated[list[Path], typer.Argument(help="two or more member model directories")],
    method: Annotated[str, typer.Option(help="average, accuracy or f1 (per-class weights)")] = "f1",
    name: Annotated[str, typer.Option(help="the ensemble card's name")] = "ensemble",
    version: Annotated[str, typer.Option(help="the ensemble card's version")] = "1.0.0",
    validate_on: Annotated[
        Path | None,
        typer.Option("--validate-on", help="recipe whose held-out fold the ensemble is scored on"),
    ] = None,
    validate_fold: Annotated[
        int | None, typer.Option("--validate-fold", help="that fold (default: the recipe's)")
    ] = None,
    half: Annotated[
        bool,
        typer.Option("--half", help="store the member weights as float16 (half the file size)"),
    ] = False,
) -> None:
    """Combine trained model directories into one ensemble model directory.

    The members share classes, body parts and preprocessing; their input sizes and
    normalisations may differ (each member resizes and normalises the ensemble's input as
    its own card says).
    """
    from dicomnode.training.ensemble import METHODS, build_ensemble

    logs.configure()
    if method not in METHODS:
        raise typer.BadParameter(f"use one of {', '.join(METHODS)}", param_hint="--method")
    path = build_ensemble(
        members,
        out,
        method=method,  # type: ignore[arg-type]
        name=name,
        version=version,
        validate_on=validate_on,
        validate_fold=validate_fold,
        half=half,
    )
    console.print(f"ensemble written to {path}")


@app.command("ensemble-cv")
def ensemble_cv(
    members: Annotated[list[Path], typer.Argument(help="two or more member model directories")],
    method: Annotated[str, typer.Option(help="average, accuracy or f1 (per-class weights)")] = "f1",
    oof: Annotated[
        list[Path] | None,
        typer.Option("--oof", help="out-of-fold CSV per member (default: each recipe's)"),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="write the figures as JSON")] = None,
) -> None:
    """Cross-validated figures of an ensemble from its members' out-of-fold predictions."""
    from dicomnode.training.ensemble import METHODS, score_out_of_fold

    logs.configure()
    if method not in METHODS:
        raise typer.BadParameter(f"use one of {', '.join(METHODS)}", param_hint="--method")
    figures = score_out_of_fold(members, method, oof)  # type: ignore[arg-type]
    cv = figures["cross_validation"]
    for key in ("balanced_accuracy", "quadratic_weighted_kappa", "auc_macro", "accuracy"):
        console.print(
            f"{key}: pooled {figures[key]:.4f}, folds {cv[key]['mean']:.4f} ± {cv[key]['sd']:.4f}"
        )
    recall = figures["per_class"]["recall"]
    console.print("recall per class: " + " ".join(f"{r:.3f}" for r in recall))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(figures, indent=2), encoding="utf-8")


@app.command()
def evaluate(
    model_dir: Path,
    data_dir: Path,
    predictions: Annotated[
        Path | None, typer.Option("--predictions", help="CSV of per-image predictions")
    ] = None,
    report: Annotated[
        Path | None, typer.Option("--report", help="folder for the evaluation report")
    ] = None,
    unseen_only: Annotated[
        bool,
        typer.Option(
            "--unseen-only",
            help="leave out the images whose pixels the model trained on (its "
            "training-images.json; `dicomnode fingerprint` writes one for an older model)",
        ),
    ] = False,
) -> None:
    """Evaluate a model directory on a folder of class subfolders (0/, 1/, ...)."""
    from dicomnode.training.evaluate import evaluate_model
    from dicomnode.training.fingerprint import none_seen

    logs.configure()
    keep_private()
    from dicomnode.training.masks import has_masks
    from dicomnode.training.pointing import pointing_game, pointing_report

    metrics = evaluate_model(
        model_dir, data_dir, predictions=predictions, report=report, unseen_only=unseen_only
    )
    table = Table("metric", "value")
    for key, value in metrics.items():
        if isinstance(value, int | float):
            table.add_row(key, f"{value:.4f}")
    if has_masks(data_dir):
        game = (
            pointing_game(model_dir, data_dir, unseen_only=unseen_only)
            if report is None
            else pointing_report(model_dir, data_dir, report, unseen_only=unseen_only)
        )
        share = f"{game['pointing_game']:.3f} ({game['hits']}/{game['abnormal_images']})"
        table.add_row(f"pointing game ({game['explanation']} peak inside the lesion mask)", share)
        table.add_row(
            "misses: peak to nearest lesion pixel / image side, median (p90)",
            f"{game['miss_distance_median']:.3f} ({game['miss_distance_p90']:.3f})",
        )
        table.add_row("peaks within 1 / 2 / 5 % of the image side of the lesion", _within(game))
    console.print(table)
    if "training_images" in metrics:
        console.print(f"[bold yellow]{metrics['training_images']}[/]")
    elif clean := none_seen(metrics.get("training_overlap", {})):
        console.print(f"[green]{clean}[/]")


@app.command()
def fingerprint(
    model_dir: Annotated[Path, typer.Argument(metavar="MODEL_DIR")],
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="the training folder, when not where the recipe says"),
    ] = None,
) -> None:
    """List the images a model trained on by their pixels (training-images.json), for a
    model trained before training wrote the list: from its card's recipe and folder."""
    from dicomnode.training.fingerprint import TRAINING_IMAGES_FILE, fingerprint_model

    logs.configure()
    listed = fingerprint_model(model_dir, data_dir)
    console.print(
        f"{model_dir / TRAINING_IMAGES_FILE}: {len(listed.trained_on)} images trained on, "
        f"{len(listed.held_out - listed.trained_on)} held out (by their pixels)"
    )


@app.command("label-export")
def label_export(
    export_dir: Annotated[
        Path, typer.Argument(metavar="EXPORT_DIR", help="a PACS export (nested DICOM files)")
    ],
    sheet: Annotated[
        Path,
        typer.Argument(
            metavar="LABELS.csv",
            help="a label column of class indices and one key column: accession_number, "
            "study_instance_uid, series_instance_uid, sop_instance_uid or path; optionally "
            "laterality (R or L)",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="the training folder to make (new)")],
    copy: Annotated[
        bool, typer.Option("--copy", help="copy the files (default: hard links)")
    ] = False,
    pictures: Annotated[
        bool,
        typer.Option("--pictures", help="take PNG, WebP and JPEG files too (a sheet by path)"),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="match and count, write nothing")
    ] = False,
    joints: Annotated[
        Path | None,
        typer.Option(
            "--joints",
            metavar="MODEL_DIR",
            help="crop each knee joint with this model's localiser (a knee model, such as "
            "models/knee-kl), labelled by the row of its side",
        ),
    ] = None,
) -> None:
    """Make a training folder (`DATA/<class>/`) from a PACS export and a label sheet.

    Exit status 1 when a row of the sheet matched no image or an image matched rows of
    different labels (left out); what matched is written all the same.
    """
    from dicomnode.training.labelled import match, read_export, read_sheet, write_folder

    logs.configure("WARNING")
    if joints is not None and pictures:
        raise typer.BadParameter("joint crops need DICOM films", param_hint="--pictures")
    labels = read_sheet(sheet)
    export = read_export(export_dir, pictures=pictures, shown=_bar("reading the headers"))
    if joints is not None:
        from dicomnode.training.joint_crops import write_joint_crops

        matched = write_joint_crops(
            labels, export, joints, None if dry_run else out, _bar("finding the joints")
        )
    else:
        matched = match(labels, export)
    _say_matched(labels, export, matched, sheet)
    if joints is not None and not dry_run:
        from dicomnode.training.joint_crops import CROP_GROUP_PATTERN

        console.print(
            f"{len(matched.images)} joint crops written into {escape(str(out))}; train with "
            f"data_dir: {escape(str(out))} and group_pattern: '{CROP_GROUP_PATTERN}' (the "
            "names begin with the hash of the Patient ID)"
        )
    elif not dry_run:
        written = write_folder(matched, export_dir, out, "copy" if copy else "link")
        console.print(
            f"{written} image{'' if written == 1 else 's'} {'copied' if copy else 'linked'} "
            f"into {escape(str(out))}; "
            f"train with data_dir: {escape(str(out))} and group_by: patient_id (the files "
            "are named by the export, not by patient)"
        )
    if matched.rows_unmatched or matched.ambiguous:
        raise typer.Exit(1)


def _bar(description: str) -> Shown:
    """A progress bar over a long loop (on the terminal only; it leaves no line behind)."""
    from rich.progress import track

    def shown(items: Sequence[Any]) -> Iterable[Any]:
        return track(items, description=description, console=err, transient=True)

    return shown


def _say_matched(labels: LabelSheet, export: Export, matched: Matched, sheet: Path) -> None:
    from dicomnode.training.data import listed

    table = Table("class", "images")
    for index, count in enumerate(matched.per_class(labels.classes)):
        table.add_row(str(index), str(count))
    console.print(table)
    for kind, count in (*export.left_out, *matched.left_out):
        console.print(f"left out: {count} × {kind}")
    if matched.files_unmatched:
        console.print(f"{matched.files_unmatched} image(s) of the export matched no row")
    if matched.ambiguous:
        console.print(
            f"[red]{len(matched.ambiguous)} image(s) matched rows of different labels[/red] "
            "(a row for the study and one for its side?): left out"
        )
    if matched.rows_unmatched:
        lines = listed([str(n) for n in matched.rows_unmatched])
        console.print(
            f"[red]rows that matched no image:[/red] lines {lines} of {escape(str(sheet))}"
        )


def _within(game: dict[str, Any]) -> str:
    return " / ".join(f"{share:.3f}" for share in game["within"].values())


def _cam_spec(method: str, layer: str, shift: int = 0) -> GradCamSpec:
    """A card's explanation from command-line options; an unknown method is a usage error."""
    from dicomnode.models.card import CAM_METHOD_NAMES

    if method not in CAM_METHOD_NAMES:
        raise typer.BadParameter(
            f"unknown {method}; use {', '.join(CAM_METHOD_NAMES)}", param_hint="--method"
        )
    return GradCamSpec.model_validate({"target_layer": layer, "method": method, "shift": shift})


def _candidates(method: str, layers: list[str], shifts: list[int]) -> list[GradCamSpec | Explainer]:
    """The explanations one ``--method`` names: SHAP once (it has no layer), else each
    layer x shift."""
    if method == "shap":
        from dicomnode.explain.shap_map import SHAP

        return [SHAP]
    return [_cam_spec(method, path, pixels) for path in layers for pixels in shifts]


@app.command()
def pointing(
    model_dir: Path,
    data_dir: Path,
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method", help="gradcam, hirescam, layercam or shap (no layer) (repeatable)"
        ),
    ] = None,
    layer: Annotated[
        list[str] | None,
        typer.Option("--layer", help="dotted layer path, several joined by + (repeatable)"),
    ] = None,
    shift: Annotated[
        list[int] | None,
        typer.Option(
            "--shift",
            min=0,
            max=MAX_CAM_SHIFT,
            help="shift-averaged maps: largest input shift in pixels, 0 for one pass (repeatable)",
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="score the first N abnormal images")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="write the results as JSON")] = None,
    unseen_only: Annotated[
        bool,
        typer.Option(
            "--unseen-only",
            help="leave out the images whose pixels the model trained on (training-images.json)",
        ),
    ] = False,
) -> None:
    """Pointing game of a model's explanations on a phantom folder; choose a card's gradcam.

    Without --method, --layer and --shift it scores the card's own explanation;
    with them, every method x layer x shift combination (the card's own fills
    in those not given). Choose on a selection set, report on a test set.
    """
    from dicomnode.models.card import load_card
    from dicomnode.training.masks import has_masks
    from dicomnode.training.pointing import compare_explanations

    logs.configure("WARNING")
    keep_private()
    if not has_masks(data_dir):
        raise typer.BadParameter(f"{data_dir} has no phantoms.csv", param_hint="DATA_DIR")
    if method and set(method) == {"shap"} and (layer or shift):
        raise typer.BadParameter(
            "SHAP has no layer and no shift; --layer and --shift apply to gradcam, "
            "hirescam and layercam",
            param_hint="--layer/--shift",
        )
    own = load_card(model_dir).gradcam
    candidates: list[GradCamSpec | Explainer | None] = (
        [
            candidate
            for name in dict.fromkeys(method or [own.method])
            for candidate in _candidates(name, layer or [own.target_layer], shift or [own.shift])
        ]
        if method or layer or shift
        else [None]
    )
    results = compare_explanations(
        model_dir, data_dir, candidates, limit=limit, unseen_only=unseen_only
    )
    table = Table(
        "explanation",
        "pointing game",
        "hits",
        "miss median (p90)",
        "within 1 / 2 / 5 %",
        "by lesion",
    )
    for game in results:
        table.add_row(
            game["explanation"],
            f"{game['pointing_game']:.3f}",
            f"{game['hits']}/{game['abnormal_images']}",
            f"{game['miss_distance_median']:.3f} ({game['miss_distance_p90']:.3f})",
            _within(game),
            " ".join(f"{k} {v['share']:.2f}" for k, v in game["by_lesion"].items()),
        )
    console.print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2), encoding="utf-8")


@app.command("record-cv")
def record_cv(
    model_dir: Annotated[Path, typer.Argument(help="the model (one fold of its recipe) to update")],
    folds: Annotated[list[Path], typer.Argument(help="the models of the recipe's other folds")],
    version: Annotated[str, typer.Option(help="the card's new version")],
    note: Annotated[str, typer.Option(help="appended to the recipe's notes")] = "",
) -> None:
    """Record the recipe's cross-validation (its fold models' figures) in a model's card."""
    from dicomnode.models.card import load_card
    from dicomnode.training.recipe_cv import RECORD, record_cross_validation

    logs.configure("WARNING")
    path = record_cross_validation(model_dir, folds, version, note)
    record = load_card(model_dir).metrics[RECORD]
    figure = record["cross_validation"]["balanced_accuracy"]
    console.print(
        f"updated {path}: balanced accuracy {figure['mean']:.3f} ± {figure['sd']:.3f} "
        f"over folds {record['folds']}"
    )


@app.command("resummarise-cv")
def resummarise_cv(
    model_dir: Path,
    version: Annotated[str, typer.Option(help="the card's new version")],
    note: Annotated[str, typer.Option(help="appended to the recipe's notes: why")] = "",
    carry_from: Annotated[
        Path | None,
        typer.Option(
            help="an earlier model.yaml of this model whose recipe CV to carry over (an "
            "ensemble of the recipe's fold models: its members' figures)"
        ),
    ] = None,
) -> None:
    """Recompute a card's cross-validation summaries from its per-fold figures (same weights)."""
    from dicomnode.training.recipe_cv import resummarise

    logs.configure("WARNING")
    console.print(f"updated {resummarise(model_dir, version, note, carry_from)}")


@app.command("set-explanation")
def set_explanation(
    model_dir: Path,
    method: Annotated[str, typer.Option(help="gradcam, hirescam or layercam")],
    layer: Annotated[str, typer.Option(help="dotted layer path, several joined by +")],
    version: Annotated[str, typer.Option(help="the card's new version")],
    shift: Annotated[
        int,
        typer.Option(min=0, max=MAX_CAM_SHIFT, help="shift averaging: largest shift (px); 0: off"),
    ] = 0,
    note: Annotated[str, typer.Option(help="appended to the recipe's notes: why")] = "",
) -> None:
    """Give a model another explanation (same weights) under a new version; see `pointing`."""
    from dicomnode.training.pointing import set_explanation as apply

    logs.configure("WARNING")
    spec = _cam_spec(method, layer, shift)
    console.print(f"updated {apply(model_dir, spec, version, note)}")


@app.command("set-test-time-flip")
def set_test_time_flip(
    model_dir: Path,
    version: Annotated[str, typer.Option(help="the card's new version")],
    on: Annotated[
        bool, typer.Option("--on/--off", help="classify each input and its mirror, and average")
    ] = True,
    note: Annotated[str, typer.Option(help="appended to the recipe's notes: why")] = "",
) -> None:
    """Serve a model trained on mirrored images with (or without) the test-time flip."""
    from dicomnode.training.revise import set_test_time_flip as apply

    logs.configure("WARNING")
    console.print(f"updated {apply(model_dir, on, version, note)}")


@app.command()
def phantoms(
    out: Annotated[Path, typer.Option("--out", help="output folder")],
    body_part: Annotated[str, typer.Option("--body-part", help="hand or spine")],
    count: Annotated[int, typer.Option(help="images to write (two per synthetic patient)")] = 200,
    seed: Annotated[int, typer.Option(help="the same seed writes the same folder")] = 0,
    size: Annotated[int, typer.Option(help="rows = columns of each image")] = 512,
    image_format: Annotated[
        list[str] | None,
        typer.Option("--format", help="dcm (DICOM DX, the default) or png (repeatable)"),
    ] = None,
) -> None:
    """Write synthetic hand or spine radiographs (DICOM DX, or PNG) with lesion masks."""
    from dicomnode.training.phantoms.cli import phantoms_command

    logs.configure()
    folder = phantoms_command(out, body_part, count, seed, size, image_format or ["dcm"])
    console.print(f"phantoms written to {folder}")


@app.command()
def explain(
    model_dir: Path,
    image: Path,
    method: Annotated[
        str, typer.Option(help="gradcam (the card's map, as the node shows it) or shap")
    ] = "gradcam",
    out: Annotated[Path, typer.Option("--out", help="PNG to write")] = Path("explanation.png"),
) -> None:
    """Explain one image with Grad-CAM or SHAP and write the overlay as a PNG."""
    from dicomnode.offline import explain_file

    logs.configure("WARNING")
    keep_private()
    written, description = explain_file(model_dir, image, method, out)
    console.print(f"written {written}: {description}")


@app.command()
def bench(
    instances: Annotated[int, typer.Option(help="instances for the receive test")] = 200,
    rounds: Annotated[int, typer.Option(help="alternating rounds per receive comparison")] = 2,
    turnaround: Annotated[int, typer.Option("--turnaround", help="one-image studies timed")] = 20,
    burst_studies: Annotated[int, typer.Option(help="studies sent at once")] = 50,
    burst_images: Annotated[int, typer.Option(help="images per burst study")] = 4,
    pacs_studies: Annotated[int, typer.Option(help="studies timed through Orthanc (0: skip)")] = 10,
    soak: Annotated[int, typer.Option(help="small images for the memory soak (0: skip)")] = 1000,
    records: Annotated[
        int, typer.Option(help="jobs in the database for the status and metrics read (0: skip)")
    ] = 700_000,
    models_dir: Annotated[Path, typer.Option("--models-dir")] = Path("models"),
    out: Annotated[Path, typer.Option("--out", help="folder for the JSON result")] = Path(
        "var/bench"
    ),
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Measure receive, turnaround and burst against dcmtk and the bare pipeline."""
    from dicomnode.bench.main import BenchOptions, run_bench

    logs.configure("WARNING")
    options = BenchOptions(
        instances=instances,
        rounds=rounds,
        turnaround_studies=turnaround,
        burst_studies=burst_studies,
        burst_images=burst_images,
        pacs_studies=pacs_studies,
        soak_images=soak,
        records_jobs=records,
        models_dir=models_dir,
        out_dir=out,
        device=device,
    )
    run_bench(options, console)


@app.command("bench-explain")
def bench_explain(
    model_dir: Path,
    method: Annotated[str | None, typer.Option(help="gradcam, hirescam or layercam")] = None,
    layer: Annotated[str | None, typer.Option(help="layer path(s) joined by +")] = None,
    shift: Annotated[
        int | None, typer.Option(min=0, max=MAX_CAM_SHIFT, help="shift averaging (px); 0: off")
    ] = None,
    batch: Annotated[int, typer.Option(min=1, help="images per pass")] = 8,
    threads: Annotated[int, typer.Option(min=1, help="torch threads")] = 1,
    max_images: Annotated[
        int, typer.Option(min=1, help="most images per pass of shifted copies (CPU node: 1)")
    ] = 1,
) -> None:
    """Time per image and peak memory of a model's explanation (the card's, or the options')."""
    from dicomnode.bench.explain import explanation_cost
    from dicomnode.models.card import load_card

    logs.configure("WARNING")
    spec = None
    if method or layer or shift is not None:
        own = load_card(model_dir).gradcam
        spec = _cam_spec(
            method or own.method, layer or own.target_layer, own.shift if shift is None else shift
        )
    cost = explanation_cost(model_dir, spec, batch=batch, threads=threads, max_images=max_images)
    console.print(
        f"{cost.explanation}: {cost.ms_per_image:.0f} ms per image (batch {cost.batch}, "
        f"{threads} thread(s)), peak RSS +{cost.peak_rss_rise_mb:.0f} MB over a forward pass"
    )


def main() -> None:
    """Run the CLI; an expected failure prints one line and exits 2 (no traceback)."""
    from sqlalchemy.exc import OperationalError

    try:
        app()
    except DicomNodeError as exc:
        _fail(str(exc))
    except OperationalError as exc:
        _fail(f"database unavailable: {str(exc.orig or exc).strip().splitlines()[0]}")
    except OSError as exc:  # a host name that does not resolve, a refused connection
        _fail(f"{type(exc).__name__}: {exc}")


def _fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/red] {message}")
    raise SystemExit(2) from None


if __name__ == "__main__":
    main()
