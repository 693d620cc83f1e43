"""`prunery jobs` with a server that sends `model_name` and `method` on each job: the table
uses them and asks for no model; an older server's jobs still get one lookup per model."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from prunery.cli.listing import jobs_table, model_names
from prunery.client import Job


def _job(**fields) -> Job:  # type: ignore[no-untyped-def]
    base = {
        "id": "job_0123456789abcdef",
        "status": "succeeded",
        "progress": 1.0,
        "model_id": "mdl_aaaa",
        "spec": {"method": {"name": "l1_norm"}, "target": {"flops": 0.5}},
        "created_at": "2026-01-01T10:00:00Z",
        "updated_at": "2026-01-01T10:01:00Z",
        "started_at": "2026-01-01T10:00:05Z",
        "finished_at": "2026-01-01T10:01:25Z",
    }
    return Job.model_validate({**base, **fields})


class _Models:
    def __init__(self) -> None:
        self.asked: list[str] = []

    def get(self, ident: str) -> argparse.Namespace:
        self.asked.append(ident)
        return argparse.Namespace(filename=f"looked-up-{ident}.onnx")


def test_names_come_from_the_job_json_without_lookups():
    models = _Models()
    jobs = [
        _job(model_name="digits_cnn.onnx", method="l1_norm"),
        _job(id="j2", model_id="mdl_bbbb", model_name="resnet.onnx"),
        _job(id="j3", model_id="mdl_gone", model_name=None),  # the server knows no name
        _job(
            id="j4",
            spec={"method": {"name": "auto"}, "target": {"flops": 0.5}},
            method="taylor",
            model_name="digits_cnn.onnx",
        ),
    ]
    names = model_names(argparse.Namespace(models=models), jobs)
    assert models.asked == []
    assert names == {"mdl_aaaa": "digits_cnn.onnx", "mdl_bbbb": "resnet.onnx"}
    text = jobs_table(jobs, 4, names, now=datetime(2026, 1, 1, 11, tzinfo=UTC))
    rows = {line.split()[0]: line for line in text.splitlines()[2:]}
    assert "digits_cnn.onnx" in rows["job_0123456789abcdef"]
    assert "resnet.onnx" in rows["j2"] and "mdl_gone" in rows["j3"]
    assert "auto → taylor" in rows["j4"]


def test_an_older_server_still_gets_one_lookup_per_model():
    models = _Models()
    jobs = [_job(), _job(id="j2"), _job(id="j3", model_id="mdl_cccc")]
    names = model_names(argparse.Namespace(models=models), jobs)
    assert models.asked == ["mdl_aaaa", "mdl_cccc"]
    assert names["mdl_cccc"] == "looked-up-mdl_cccc.onnx"
