"""Peers: what the admin may add, change and remove, and what the configuration file owns."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.config import PeerSettings, Settings
from dicomnode.db.session import Database
from dicomnode.errors import ConfigError, PeerError
from dicomnode.peers import (
    PeerInfo,
    add_peer,
    list_peers,
    remove_peer,
    sync_config_peers,
    update_peer,
    validate,
)

pytestmark = pytest.mark.both_databases  # every test taking `db` runs on SQLite and PostgreSQL


@pytest.mark.parametrize(
    ("name", "ae_title"), [("P1", "PACS\n"), ("P1\n", "PACS"), ("P1", "A" * 17), ("P1", "A\\B")]
)
def test_names_and_ae_titles_must_match_whole(name: str, ae_title: str) -> None:
    with pytest.raises(PeerError):
        validate(PeerInfo(name, ae_title, "127.0.0.1", 104))


def test_an_ae_title_belongs_to_one_peer(db: Database) -> None:
    with db.session() as s:
        add_peer(s, PeerInfo("PACS", "ORTHANC", "127.0.0.1", 4242))
        with pytest.raises(PeerError, match="belongs to peer 'PACS'"):
            add_peer(s, PeerInfo("ARCHIVE", "ORTHANC", "127.0.0.2", 104))
        add_peer(s, PeerInfo("ARCHIVE", "ARCH", "127.0.0.2", 104))
        with pytest.raises(PeerError, match="belongs to peer 'PACS'"):
            update_peer(s, "ARCHIVE", ae_title="ORTHANC")
        assert update_peer(s, "PACS", port=4243).port == 4243  # its own title is fine


def test_the_files_peers_are_changed_in_the_file_and_leave_with_it(db: Database) -> None:
    in_file = {"PACS": PeerSettings(ae_title="ORTHANC", host="127.0.0.1", port=4242)}
    with db.session() as s:
        sync_config_peers(s, in_file)
        with pytest.raises(PeerError, match="configuration file; change it there"):
            update_peer(s, "PACS", port=5555)
        with pytest.raises(PeerError, match="configuration file; remove it there"):
            remove_peer(s, "PACS")
        add_peer(s, PeerInfo("MODALITY", "DX1", "127.0.0.3", 104))
    with db.session() as s:
        sync_config_peers(s, {})  # PACS was deleted from the file
        assert [p.name for p in list_peers(s)] == ["MODALITY"]  # the CLI's peer stays


def test_a_result_destination_cannot_be_removed(db: Database) -> None:
    with db.session() as s:
        add_peer(s, PeerInfo("ARCHIVE", "ARCH", "127.0.0.2", 104))
        with pytest.raises(PeerError, match="result destination"):
            remove_peer(s, "ARCHIVE", destinations=("ARCHIVE",))
        remove_peer(s, "ARCHIVE")
        assert list_peers(s) == []


def test_serve_refuses_a_destination_that_is_no_peer(db: Database, settings: Settings) -> None:
    from dicomnode.service import _check_destinations

    results = settings.results.model_copy(update={"destinations": ("PCAS",)})
    mistyped = settings.model_copy(update={"results": results})
    routed = settings.results.model_copy(update={"routes": {"knee-kl": ("PACS", "ORHTO")}})
    mistyped_route = settings.model_copy(update={"results": routed})
    with db.session() as s:
        add_peer(s, PeerInfo("PACS", "ORTHANC", "127.0.0.1", 4242))
        with pytest.raises(ConfigError, match="names PCAS, not a peer"):
            _check_destinations(s, mistyped)
        with pytest.raises(ConfigError, match="names ORHTO, not a peer"):
            _check_destinations(s, mistyped_route)
        _check_destinations(s, settings)


def test_serve_refuses_a_route_for_a_model_it_does_not_have(
    settings: Settings, tmp_path: Path
) -> None:
    """A mistyped model name would send that model's results to results.destinations."""
    from dicomnode.models.registry import ModelRegistry
    from dicomnode.service import _check_routes
    from dicomnode.testing.models import make_tiny_model

    make_tiny_model(tmp_path / "models" / "knee", num_classes=5)
    registry = ModelRegistry.load(tmp_path / "models")

    def routed(routes: dict[str, tuple[str, ...]]) -> Settings:
        results = settings.results.model_copy(update={"routes": routes})
        return settings.model_copy(update={"results": results})

    with pytest.raises(ConfigError, match=r"names knee-kl, not a model .*models: tiny-knee"):
        _check_routes(routed({"knee-kl": ("PACS",)}), registry)
    _check_routes(routed({"tiny-knee": ()}), registry)


def test_a_peer_that_a_route_names_cannot_be_removed(db: Database, settings: Settings) -> None:
    results = settings.results.model_copy(update={"routes": {"knee-kl": ("ARCHIVE",)}})
    with db.session() as s:
        add_peer(s, PeerInfo("ARCHIVE", "ARCH", "127.0.0.2", 104))
        with pytest.raises(PeerError, match=r"results\.routes"):
            remove_peer(s, "ARCHIVE", results.receiving_peers())


def test_nodes_starting_at_once_both_write_the_files_peers(db: Database) -> None:
    """Two replicas of `serve` start together on a database without the file's peers (on
    PostgreSQL the second failed on the peers' primary key and did not start)."""
    from threading import Barrier, Thread

    from dicomnode.db.schema import Peer

    peers = {
        f"PACS{i}": PeerSettings(ae_title=f"PACS{i}", host="127.0.0.1", port=104 + i)
        for i in range(3)
    }
    failures: list[BaseException] = []
    for _ in range(5):
        with db.session() as session:
            session.query(Peer).delete()
        together = Barrier(2)

        def start(together: Barrier = together) -> None:
            together.wait()
            try:
                with db.session() as session:
                    sync_config_peers(session, peers)
            except BaseException as exc:
                failures.append(exc)

        nodes = [Thread(target=start) for _ in range(2)]
        for node in nodes:
            node.start()
        for node in nodes:
            node.join(60)
    assert failures == []
    with db.session() as session:
        assert sorted(p.name for p in session.query(Peer)) == ["PACS0", "PACS1", "PACS2"]


def test_a_dicomweb_only_peer_needs_no_dicom_address(db: Database) -> None:
    """A STOW-RS-only archive (a cloud or VNA service) has no DICOM port, and need not have
    a host: the settings file and the CLI take it without inventing one."""
    url = "https://vna.example/dicom-web"
    declared = PeerSettings(ae_title="VNA", dicomweb=url)
    assert (declared.host, declared.port) == ("", 0)
    assert PeerInfo.from_settings("VNA", declared).address == "VNA (no DICOM port, no host)"
    with db.session() as s:
        sync_config_peers(s, {"VNA": declared})
        add_peer(s, PeerInfo("CLOUD", "CLOUD", "", 0, dicomweb=url))
        add_peer(s, PeerInfo("ROUTER", "ROUTER", "10.0.0.5", 0, dicomweb=url))  # calls us
    with db.session() as s:
        peers = {p.name: p for p in list_peers(s)}
        assert (peers["VNA"].host, peers["VNA"].port, peers["VNA"].source) == ("", 0, "config")
        assert peers["ROUTER"].address == "ROUTER (no DICOM port)"
        # back to C-STORE, it needs an address again; given one, it is a plain peer
        with pytest.raises(PeerError, match="needs a dicomweb URL"):
            update_peer(s, "CLOUD", dicomweb="")
        with pytest.raises(PeerError, match="host must not be empty"):
            update_peer(s, "CLOUD", dicomweb="", port=104)
        plain = update_peer(s, "CLOUD", dicomweb="", host="10.0.0.6", port=104)
        assert plain.address == "CLOUD@10.0.0.6:104"
        assert update_peer(s, "ROUTER", host="").host == ""  # "" clears it


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"host": "127.0.0.1"}, "port must be 1-65535: a peer without a DICOM port"),
        ({"port": 104}, "host must not be empty"),
        ({"host": " ", "port": 104, "dicomweb": "https://vna/dicom-web"}, "host must not be"),
    ],
)
def test_a_dicom_peer_needs_host_and_port(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PeerSettings.model_validate({"ae_title": "PACS", **fields})
    info = PeerInfo(
        "PACS",
        "PACS",
        str(fields.get("host", "")),
        int(str(fields.get("port", 0))),
        dicomweb=str(fields.get("dicomweb", "")),
    )
    with pytest.raises(PeerError, match=message):
        validate(info)
    with pytest.raises(PeerError, match="port 70000 must be 1-65535"):
        validate(PeerInfo("PACS", "PACS", "127.0.0.1", 70000))
