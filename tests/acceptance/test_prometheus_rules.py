"""The shipped alerting rules (`config/prometheus/dicomnode-alerts.yml`) are valid for
Prometheus (`promtool check rules`) and fire on the series the node really exposes: the
input of `promtool test rules` is the node's own `/metrics` text, read from a database in a
known state (a dead send, a destination retrying, work waiting five minutes). Every query of
the shipped Grafana dashboard (`config/grafana/dicomnode-dashboard.json`) is valid PromQL
and gives data on those series."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from dicomnode.config import Settings
from dicomnode.db.schema import Job
from dicomnode.db.session import Database, utcnow
from dicomnode.metrics import exposition
from dicomnode.testing.rows import (
    fill_known_state,
    instance_row,
    metrics_without_a_database,
    result_row,
    round_row,
)

RULES = Path(__file__).parents[2] / "config" / "prometheus" / "dicomnode-alerts.yml"
DASHBOARD = Path(__file__).parents[2] / "config" / "grafana" / "dicomnode-dashboard.json"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
TARGET = {"job": "dicomnode", "instance": "node:9464"}
FREE = 50 * 2**30
"""The free space the series say (the test host's own would make the disk alert depend on
the machine): 50 GiB, far above the floor."""

pytestmark = [
    pytest.mark.acceptance,
    pytest.mark.skipif(not Path(PROMTOOL).exists(), reason="promtool (Debian prometheus) missing"),
]


def _series(text: bytes, minutes: int) -> list[dict[str, str]]:
    """Every ``dicomnode_*`` and ``process_*`` sample of ``text`` as a promtool input series,
    constant for ``minutes``, labelled as a scrape of :data:`TARGET` labels it; and ``up`` 1."""
    series = [{"series": _selector("up", {}), "values": f"1x{minutes}"}]
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if not sample.name.startswith(("dicomnode_", "process_")):
                continue
            value = FREE if sample.name == "dicomnode_storage_free_bytes" else sample.value
            series.append(
                {"series": _selector(sample.name, sample.labels), "values": f"{value:g}x{minutes}"}
            )
    return series


def _selector(name: str, labels: dict[str, str]) -> str:
    pairs = {**labels, **TARGET}
    return name + "{" + ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(pairs.items())) + "}"


def _description(alert: str) -> str:
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    return str(next(r for r in rules if r["alert"] == alert)["annotations"]["description"])


def _fires(alert: str, summary: str, **labels: str) -> dict[str, Any]:
    return {
        "exp_labels": {"severity": "warning", "instance": TARGET["instance"], **labels},
        "exp_annotations": {"summary": summary, "description": _description(alert)},
    }


def _promtool_test(
    tmp_path: Path, series: list[dict[str, str]], checks: list[Any], rules: Path = RULES
) -> None:
    test = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": checks}],
    }
    path = tmp_path / "dicomnode-alerts-test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_are_valid() -> None:
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 12 rules found" in result.stdout


def test_rules_fire_on_the_nodes_own_series(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    fill_known_state(
        db
    )  # a dead send to ARCH, a send to PACS retrying, infer work due five minutes
    text, database_up = exposition(db, settings)
    assert database_up
    at = {"eval_time": "45m"}
    _promtool_test(
        tmp_path,
        _series(text, 90),
        [
            {
                **at,
                "alertname": "DicomnodeDeadJobs",
                "exp_alerts": [
                    _fires("DicomnodeDeadJobs", "dicomnode has 1 dead send job(s)", kind="send")
                ],
            },
            {
                **at,
                "alertname": "DicomnodeDestinationRetrying",
                "exp_alerts": [
                    _fires(
                        "DicomnodeDestinationRetrying",
                        "dicomnode cannot deliver results to PACS",
                        peer="PACS",
                    )
                ],
            },
            *(
                {**at, "alertname": quiet, "exp_alerts": []}
                for quiet in (
                    "DicomnodeDown",
                    "DicomnodeDatabaseDown",
                    "DicomnodeWorkWaiting",  # five minutes, under the rule's ten
                    "DicomnodeUrgentWorkWaiting",  # the waiting work is routine
                    "DicomnodeDiskLow",
                    "DicomnodeSlowTurnaround",
                    "DicomnodeAuditBacklog",  # the audit trail is off: no such series
                    "DicomnodeCertificateEndsSoon",  # no TLS files: no such series
                )
            ),
        ],
    )


def test_an_urgent_study_waiting_fires_its_alert(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    """The analysis due for five minutes is urgent: over the rule's two minutes, it fires."""
    fill_known_state(db)
    with db.session() as s:
        s.execute(update(Job).where(Job.dedupe_key == "infer:0").values(priority=2))
    text, _ = exposition(db, settings)
    series = _series(text, 30)
    (urgent,) = [
        s
        for s in series
        if s["series"].startswith("dicomnode_jobs_oldest_urgent_due_age_seconds")
        and 'kind="infer"' in s["series"]
    ]
    assert 299 <= float(urgent["values"].split("x")[0]) < 400  # the node's own figure
    urgent["values"] = "300x30"  # whole seconds, for the summary promtool compares
    fires = _fires(
        "DicomnodeUrgentWorkWaiting", "dicomnode urgent infer work has waited 5m 0s", kind="infer"
    )
    _promtool_test(
        tmp_path,
        series,
        [{"eval_time": "10m", "alertname": "DicomnodeUrgentWorkWaiting", "exp_alerts": [fires]}],
    )


def test_an_audit_backlog_fires_its_alert(db: Database, settings: Settings, tmp_path: Path) -> None:
    """A message an hour old in the spool (the repository down since): the alert fires;
    with the spool empty it stays quiet."""
    from dicomnode.audit.spool import spool_of
    from dicomnode.config import AuditSettings
    from dicomnode.testing.peers import LOOPBACK, free_port

    audit = AuditSettings(transport="tcp", host=LOOPBACK, port=free_port())
    on = settings.model_copy(update={"audit": audit})
    quiet, _ = exposition(db, on)
    spool = spool_of(on)
    spool.folder.mkdir(parents=True)
    an_hour_ago = time.time_ns() - 3600 * 10**9
    (spool.folder / f"{an_hour_ago:020d}-1-000000000.msg").write_bytes(b"<14>1 ...")
    waiting, _ = exposition(db, on)
    assert b"dicomnode_audit_spooled_messages 1.0" in waiting
    summary = (
        "dicomnode's audit messages have waited 15 minutes or more for the audit record repository"
    )
    check = {"eval_time": "10m", "alertname": "DicomnodeAuditBacklog"}
    _promtool_test(
        tmp_path,
        _series(waiting, 30),
        [{**check, "exp_alerts": [_fires("DicomnodeAuditBacklog", summary)]}],
    )
    _promtool_test(tmp_path, _series(quiet, 30), [{**check, "exp_alerts": []}])


@pytest.mark.parametrize(("uncertain", "fires"), [(8, True), (2, False)])
def test_a_model_often_unsure_of_the_joint_fires_its_alert(
    db: Database, settings: Settings, tmp_path: Path, uncertain: int, fires: bool
) -> None:
    """24 knee joints graded in the last day: 8 of them localised with doubt (a third) fire
    the alert, 2 do not."""
    made = round_row(db, "5", image_at=utcnow(), made_at=utcnow())
    with db.session() as s:
        uids = [f"1.7.{i}" for i in range(24)]
        s.add_all(instance_row(uid, "a1", report_id=made) for uid in uids)
        s.flush()
        s.add_all(
            result_row(uid, made, "knee-kl", "2", (i % 5, i < uncertain))
            for i, uid in enumerate(uids)
        )
    text, _ = exposition(db, settings)
    alerts = []
    if fires:
        summary = "knee-kl was unsure where the joint is in 33.33% of the last day's findings"
        alerts = [_fires("DicomnodeLocalisationOftenUncertain", summary, model="knee-kl")]
    _promtool_test(
        tmp_path,
        _series(text, 90),
        [
            {
                "eval_time": "70m",
                "alertname": "DicomnodeLocalisationOftenUncertain",
                "exp_alerts": alerts,
            }
        ],
    )


def _with_tls_files(settings: Settings, tmp_path: Path) -> Settings:
    """``settings`` with the node's certificate, key and CA of a throwaway PKI."""
    from dicomnode.testing.tls import make_pki

    pki = make_pki(tmp_path / "pki")
    tls = settings.tls.model_copy(
        update={
            "certificate": pki.node.certificate,
            "private_key": pki.node.private_key,
            "ca_certificates": pki.ca_certificate,
        }
    )
    return settings.model_copy(update={"tls": tls})


def test_a_certificate_that_ends_soon_fires_its_alert(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    """The node's own series of its TLS files: each certificate's end as a Unix time. In
    promtool's clock (time() counts from 0) the node's certificate ends after 20 days, the
    CA's after 60: the first fires, the second not."""
    text, _ = exposition(db, _with_tls_files(settings, tmp_path))
    series = [s for s in _series(text, 90) if "tls_expiry" in s["series"]]
    by_subject = {s["series"].split("subject=")[1].rstrip("}"): s for s in series}
    assert set(by_subject) == {'"CN=test test CA"', '"CN=test-node"'}
    ca, node = by_subject['"CN=test test CA"'], by_subject['"CN=test-node"']
    ends = float(node["values"].split("x")[0])  # two days on, to the six digits kept
    assert abs(ends - time.time() - 2 * 86400) < 6000
    node["values"], ca["values"] = f"{20 * 86400}x90", f"{60 * 86400}x90"
    fires = _fires(
        "DicomnodeCertificateEndsSoon",
        "tls.certificate of dicomnode (CN=test-node) ends in 19d 22h 30m 0s",
        setting="tls.certificate",
        subject="CN=test-node",
    )
    _promtool_test(
        tmp_path,
        series,
        [{"eval_time": "90m", "alertname": "DicomnodeCertificateEndsSoon", "exp_alerts": [fires]}],
    )


def test_database_down_fires_its_alert(tmp_path: Path) -> None:
    text, database_up = metrics_without_a_database(tmp_path)
    assert not database_up
    down = {
        "exp_labels": {
            "severity": "critical",
            "job": TARGET["job"],
            "instance": TARGET["instance"],
        },
        "exp_annotations": {
            "summary": "dicomnode cannot read its database",
            "description": _description("DicomnodeDatabaseDown"),
        },
    }
    _promtool_test(
        tmp_path,
        _series(text, 10),
        [
            {"eval_time": "5m", "alertname": "DicomnodeDatabaseDown", "exp_alerts": [down]},
            {"eval_time": "5m", "alertname": "DicomnodeDeadJobs", "exp_alerts": []},
        ],
    )


def _dashboard_queries() -> dict[str, str]:
    """Each target of each panel of the dashboard, by ``<panel id><refId>``, with the
    dashboard's variables as Grafana fills them for the job ``dicomnode`` and every instance."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert (
                panel["datasource"]
                == target["datasource"]
                == {
                    "type": "prometheus",
                    "uid": "${datasource}",
                }
            )
            expr = target["expr"].replace("$job", TARGET["job"]).replace("$instance", ".*")
            assert "$" not in expr, expr
            queries[f"{panel['id']}{target['refId']}"] = expr
    return queries


def test_every_dashboard_query_gives_data_on_the_nodes_own_series(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    """Each query becomes a rule that fires when the query has no result (``absent``):
    promtool checks them as PromQL, then none may fire on the node's own series."""
    queries = _dashboard_queries()
    assert len(queries) >= 15
    rules = tmp_path / "dashboard-queries.yml"
    rules.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "dashboard",
                        "rules": [
                            {"alert": f"Empty{key}", "expr": f"absent({expr})"}
                            for key, expr in queries.items()
                        ],
                    }
                ]
            }
        )
    )
    check = subprocess.run(
        [PROMTOOL, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    fill_known_state(db)
    text, _ = exposition(db, _with_tls_files(settings, tmp_path))  # the certificates' panel
    _promtool_test(
        tmp_path,
        _series(text, 90),
        [{"eval_time": "70m", "alertname": f"Empty{key}", "exp_alerts": []} for key in queries],
        rules=rules,
    )
