"""The public job carries the model's file name and the method that ran (auto's choice once the
report says it), so `prunery jobs` needs no per-model lookups."""

from __future__ import annotations

from apikit import job_spec


def _submit(client, uploaded, **extra):  # type: ignore[no-untyped-def]
    r = client.post(
        "/v1/jobs",
        headers=uploaded["headers"],
        json=job_spec(uploaded["model_id"], uploaded["dataset_id"], **extra),
    )
    assert r.status_code == 202, r.text
    return r.json()


def test_job_json_names_the_model_and_method(client, uploaded):
    job = _submit(client, uploaded)
    assert job["model_name"] == "net.onnx" and job["method"] == "l1_norm"
    got = client.get(f"/v1/jobs/{job['id']}", headers=uploaded["headers"]).json()
    assert got["model_name"] == "net.onnx" and got["method"] == "l1_norm"
    page = client.get("/v1/jobs", headers=uploaded["headers"]).json()
    assert [(j["id"], j["model_name"]) for j in page["data"]] == [(job["id"], "net.onnx")]


def test_auto_shows_the_method_it_chose_once_reported(client, uploaded):
    from core.orm import Job

    job = _submit(client, uploaded, method={"name": "auto", "params": {}})
    assert job["method"] == "auto"
    with client.app.state.sessionmaker() as s:
        row = s.get(Job, job["id"])
        row.report = {"method": {"name": "taylor", "params": {}}}
        s.commit()
    got = client.get(f"/v1/jobs/{job['id']}", headers=uploaded["headers"]).json()
    assert got["method"] == "taylor" and got["spec"]["method"]["name"] == "auto"


def test_a_deleted_model_leaves_no_name(client, uploaded):
    from core.orm import ModelFile

    job = _submit(client, uploaded)
    with client.app.state.sessionmaker() as s:
        s.delete(s.get(ModelFile, uploaded["model_id"]))
        s.commit()
    got = client.get(f"/v1/jobs/{job['id']}", headers=uploaded["headers"]).json()
    assert got["model_id"] is None and got["model_name"] is None
    listed = client.get("/v1/jobs", headers=uploaded["headers"]).json()["data"]
    assert listed[0]["model_name"] is None


def test_openapi_declares_the_fields(client):
    schema = client.get("/openapi.json").json()["components"]["schemas"]["JobPublic"]
    assert {"model_name", "method"} <= set(schema["properties"])
