"""Tracebacks of internal errors are kept for the operator (a `debug` event, printed by
`python -m app.admin job-debug`) and never returned by the public API."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import servicekit
from apikit import job_spec

pytestmark = pytest.mark.service


def test_debug_events_are_for_the_operator_only(client, uploaded, base_settings):
    from core.db import transaction
    from core.orm import Job, JobEvent

    h = uploaded["headers"]
    job = client.post(
        "/v1/jobs", headers=h, json=job_spec(uploaded["model_id"], uploaded["dataset_id"])
    ).json()
    factory = client.app.state.sessionmaker
    with transaction(factory) as s:
        row = s.get(Job, job["id"])
        s.add(
            JobEvent(
                job_id=row.id, kind="debug", message="Traceback (most recent call last):\n  planted"
            )
        )

    events = client.get(
        f"/v1/jobs/{job['id']}/events", headers={**h, "Accept": "application/json"}
    ).json()
    assert [e["kind"] for e in events] == ["state"]
    with client.stream(
        "GET", f"/v1/jobs/{job['id']}/events", headers=h, params={"after": 0}
    ) as stream:
        client.post(f"/v1/jobs/{job['id']}/cancel", headers=h)
        body = "".join(stream.iter_text())
    assert "planted" not in body and "Traceback" not in body

    env = {**os.environ, **servicekit.settings_env(base_settings)}
    r = subprocess.run(
        [sys.executable, "-m", "app.admin", "job-debug", job["id"], "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=servicekit.REPO,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tracebacks"] == ["Traceback (most recent call last):\n  planted"]
