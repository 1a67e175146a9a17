from pathlib import Path

import pytest

from dicomnode.config import load_settings
from dicomnode.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "config" / "dicomnode.yaml"


def test_example_config_loads_with_the_documented_defaults() -> None:
    settings = load_settings(EXAMPLE, environ={})
    assert settings.node.ae_title == "DICOMNODE"
    assert settings.node.port == 11112
    assert settings.node.allow_unknown_callers is False
    assert settings.storage.min_free_mb == 500
    assert settings.storage.umask_bits == 0o027
    assert settings.database.url == "sqlite:///var/dicomnode.db"
    assert settings.peers["PACS"].ae_title == "ORTHANC"
    assert settings.results.destinations == ("PACS",)
    assert settings.study.settle_seconds == 2
    assert (settings.workers.count, settings.workers.batch_size, settings.workers.device) == (
        2,
        8,
        "auto",
    )


def test_precedence_defaults_file_env_cli(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("node: {port: 2000, ae_title: FILEAE}\nworkers: {count: 3}\n")
    settings = load_settings(
        config,
        environ={"DICOMNODE_NODE__PORT": "3000", "DICOMNODE_WORKERS__DEVICE": "cpu"},
        overrides={"node": {"port": 4000}},
    )
    assert settings.node.port == 4000  # CLI beats env beats file
    assert settings.node.ae_title == "FILEAE"  # file beats default
    assert settings.workers.device == "cpu"  # env
    assert settings.workers.count == 3
    assert settings.workers.batch_size == 8  # default


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("node: {prot: 1}", "node.prot"),
        ("node: {port: 70000}", "node.port"),
        ("node: {ae_title: 'MUCH_TOO_LONG_AE_TITLE'}", "node.ae_title"),
        ("workers: {device: tpu}", "workers.device"),
        ("storage: {min_free_mb: -1}", "storage.min_free_mb"),
        ("storage: {umask: '0999'}", "storage.umask"),
        ("storage: {umask: '022'}", "other local users must not read or write patient data"),
        ("storage: {umask: '000'}", "storage.umask"),
        ("storage: {umask: 027}", 'write the umask in quotes, e.g. umask: "027"'),
        ("storage: {records_days: 10}", "records_days (10) must be at least retention_days (30)"),
        ("storage: {retention_days: 0, records_days: 400}", "records_days needs retention_days"),
        ("routing: {body_part_aliases: {FOOT: [FOOT]}}", "routing.body_part_aliases"),
        ("database: {url: 'mysql://x'}", "database.url"),
    ],
)
def test_bad_key_or_value_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(config, environ={})
    assert key in str(info.value)


def test_destination_must_be_a_declared_peer(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "peers: {PACS: {ae_title: A, host: h, port: 1}}\nresults: {destinations: [PAC]}\n"
    )
    with pytest.raises(ConfigError, match="PAC"):
        load_settings(config, environ={})


def test_environment_lists_are_yaml_and_flags_text(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        environ={
            "DICOMNODE_NODE__ALLOW_UNKNOWN_CALLERS": "true",
            "DICOMNODE_ROUTING__MODALITIES": "[DX]",
        },
    )
    assert settings.node.allow_unknown_callers is True
    assert settings.routing.modalities == ("DX",)


def test_routes_come_as_a_whole_mapping_and_their_peers_count_as_receivers() -> None:
    """Model names hold hyphens, which no shell variable name can: a route is given in
    ``DICOMNODE_RESULTS__ROUTES`` as a mapping."""
    settings = load_settings(
        None,
        environ={
            "DICOMNODE_RESULTS__DESTINATIONS": "[PACS]",
            "DICOMNODE_RESULTS__ROUTES": "{knee-kl: [PACS, ORTHO], hand-ra: []}",
        },
    )
    assert settings.results.routes == {"knee-kl": ("PACS", "ORTHO"), "hand-ra": ()}
    assert settings.results.receiving_peers() == ("PACS", "ORTHO")


@pytest.mark.parametrize("title", ["NO", "1234", "ON", "0.5"])
def test_an_ae_title_from_the_environment_stays_text(title: str) -> None:
    settings = load_settings(
        None, environ={"DICOMNODE_NODE__AE_TITLE": title, "DICOMNODE_NODE__PORT": "104"}
    )
    assert settings.node.ae_title == title
    assert settings.node.port == 104


def test_environment_can_set_a_peer_by_its_name() -> None:
    settings = load_settings(
        None,
        environ={
            "DICOMNODE_PEERS__PACS__HOST": "orthanc",
            "DICOMNODE_PEERS__PACS__AE_TITLE": "ORTHANC",
            "DICOMNODE_PEERS__PACS__PORT": "4242",
        },
    )
    assert settings.peers["PACS"].host == "orthanc"
    assert settings.peers["PACS"].port == 4242


def test_torch_threads_share_the_cores_among_the_workers() -> None:
    import os

    from dicomnode.service import torch_threads

    cores = os.cpu_count() or 1
    assert torch_threads(3, 2) == 3
    assert torch_threads(0, 1) == cores
    assert torch_threads(0, 2) == max(1, cores // 2)
    assert torch_threads(0, 4 * cores) == 1


def test_the_fork_server_preload_freezes_what_torch_made() -> None:
    import subprocess
    import sys

    from dicomnode.service import WORKER_PRELOAD

    code = "import gc, sys; [__import__(m) for m in sys.argv[1:]]; print(gc.get_freeze_count())"
    run = subprocess.run(
        [sys.executable, "-c", code, *WORKER_PRELOAD],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert int(run.stdout) > 50_000  # torch and timm alone make hundreds of thousands


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "peers: {A: {ae_title: PACS, host: h, port: 1}, B: {ae_title: PACS, host: i, port: 2}}",
            "peers A and B have the same AE title 'PACS'",
        ),
        (
            "node: {ae_title: ORTHANC}\npeers: {PACS: {ae_title: ORTHANC, host: h, port: 1}}",
            "peer PACS has the node's own AE title 'ORTHANC'",
        ),
    ],
)
def test_ae_titles_are_distinct(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(config, environ={})


def test_kubernetes_service_links_are_not_settings() -> None:
    """A Service named dicomnode gives each pod DICOMNODE_PORT, DICOMNODE_SERVICE_HOST, ..."""
    links = {
        "DICOMNODE_PORT": "tcp://10.0.0.1:11112",
        "DICOMNODE_PORT_11112_TCP": "tcp://10.0.0.1:11112",
        "DICOMNODE_PORT_11112_TCP_ADDR": "10.0.0.1",
        "DICOMNODE_PORT_11112_TCP_PORT": "11112",
        "DICOMNODE_PORT_11112_TCP_PROTO": "tcp",
        "DICOMNODE_SERVICE_HOST": "10.0.0.1",
        "DICOMNODE_SERVICE_PORT": "11112",
        "DICOMNODE_SERVICE_PORT_DICOM": "11112",
    }
    settings = load_settings(None, environ={**links, "DICOMNODE_NODE__PORT": "11113"})
    assert settings.node.port == 11113
    with pytest.raises(ConfigError, match="unknown key"):
        load_settings(None, environ={"DICOMNODE_NODE_PORT": "11113"})  # a typo is still named


def test_the_benchmarks_variable_is_not_a_setting() -> None:
    """README names $DICOMNODE_BENCH_KNEE_CROPS: exported, it made every command refuse to
    start (unknown key bench_knee_crops), the benchmark's own node included."""
    from dicomnode.bench.data import KNEE_CROPS_VARIABLE

    settings = load_settings(None, environ={KNEE_CROPS_VARIABLE: "/data/crops"})
    assert settings.node.port == 11112


def test_a_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("node: {port: 11112}\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(config, environ={"DICOMNODE_NODE__PORT": "eleven"})
    message = str(raised.value)
    assert f"from {config}; environment DICOMNODE_NODE__PORT" in message
    assert "node.port" in message
