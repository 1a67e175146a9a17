"""Urgent studies first: an image sent with C-STORE Priority HIGH, or by an AE title of
``routing.urgent_callers``, is analysed, reported and sent before a backlog of routine ones;
one from ``routing.background_callers`` waits for every other."""

from __future__ import annotations

import time

from dicomnode.history import study_history
from dicomnode.receive import statuses
from dicomnode.testing.images import make_radiograph
from dicomnode.testing.inprocess import InProcessNode as Node
from dicomnode.testing.peers import wait_for

HIGH, LOW = 1, 2
"""C-STORE request Priority values (MEDIUM is 0)."""


def test_an_urgent_study_is_reported_before_the_backlog_and_a_background_one_after(
    node: Node,
) -> None:
    node.pause()  # a backlog builds while nothing is analysed
    background = make_radiograph(body_part="KNEE", seed=1)
    routine = [make_radiograph(body_part="KNEE", seed=s) for s in (2, 3, 4)]
    urgent = make_radiograph(body_part="KNEE", seed=5)
    assert node.send(background, priority=LOW) == [statuses.SUCCESS]
    assert node.send(*routine) == [statuses.SUCCESS] * 3
    assert node.send(urgent, priority=HIGH) == [statuses.SUCCESS]
    assert [node.instance(d.SOPInstanceUID).priority for d in (background, urgent)] == [0, 2]
    time.sleep(2 * node.settings.study.settle_seconds)  # every study settles before it runs
    node.resume()

    def reports() -> list[str]:
        return [str(d.StudyInstanceUID) for d in node.collector.received if d.Modality == "SR"]

    wait_for(lambda: len(reports()) == 5, 120, what="five SRs")
    assert reports()[0] == urgent.StudyInstanceUID
    assert reports()[-1] == background.StudyInstanceUID
    with node.db.session() as session:
        history = study_history(session, str(urgent.StudyInstanceUID))
    assert history is not None and history.images[0].priority == "high"
