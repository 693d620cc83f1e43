"""POST /v1/models/{id}/analysis with a job spec: the request is validated like a job spec
(422 for a bad one), the spec is stored on the analysis row (the task message is still just
the analysis id), and the worker's analysis estimates the job time for that spec. The worker
task body (`worker.side_tasks.run_analysis`) runs here in-process on the same Postgres and
storage the API wrote to."""

from __future__ import annotations

import base64
import json
import math

import pytest
from apikit import REDIS_DB, npz_bytes


def _newest_message(client) -> dict:
    import redis
    import servicekit

    r = redis.Redis.from_url(servicekit.redis_url(REDIS_DB))
    return json.loads(r.lrange(client.app.state.settings.job_queue, 0, 0)[0])


@pytest.fixture()
def model_and_data(client, tenant, onnx_bytes) -> dict:
    h = tenant["headers"]
    m = client.post("/v1/models", headers=h, files={"file": ("net.onnx", onnx_bytes)})
    # 400 training samples: 50 steps per epoch at batch 8, so the recovery part is large
    # enough against the estimate's rounding (milliseconds).
    d = client.post("/v1/datasets", headers=h, files={"file": ("data.npz", npz_bytes(n_train=400))})
    assert m.status_code == 201 and d.status_code == 201, (m.text, d.text)
    return {**tenant, "model_id": m.json()["id"], "dataset_id": d.json()["id"]}


def _run(client, analysis_id: str) -> str:
    from worker.runtime import Runtime
    from worker.side_tasks import run_analysis

    state = client.app.state
    return run_analysis(Runtime(state.settings, state.sessionmaker, state.storage), analysis_id)


def test_analysis_time_estimate_follows_the_requested_spec(client, model_and_data):
    h, model_id = model_and_data["headers"], model_and_data["model_id"]
    estimates = {}
    for epochs in (2, 4):
        r = client.post(
            f"/v1/models/{model_id}/analysis",
            headers=h,
            json={
                "dataset_id": model_and_data["dataset_id"],
                "spec": {
                    "method": {"name": "l1_norm"},
                    # a fixed lr: the recovery is then epochs x steps (lr null adds its choice)
                    "recovery": {"epochs": epochs, "batch_size": 8, "lr": 1e-3},
                    "target": {"flops": 0.6},
                },
            },
        )
        assert r.status_code == 202, r.text
        row = r.json()
        stored = row["params"]["spec"]
        assert stored["recovery"]["epochs"] == epochs and stored["recovery"]["batch_size"] == 8
        assert stored["target"]["flops"] == 0.6
        assert stored["method"]["params"]["allocation"] == "uniform"  # defaults filled in
        # The wire format is unchanged: the message carries only the analysis id.
        message = _newest_message(client)
        assert message["headers"]["task"] == "workers.side_tasks.analyze_model"
        args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        assert args == [row["id"]] and kwargs == {}

        assert _run(client, row["id"]) == "succeeded"
        got = client.get(f"/v1/models/{model_id}/analysis", headers=h).json()
        assert got["id"] == row["id"] and got["status"] == "succeeded", got
        estimates[epochs] = got["result"]["time_estimate"]

    for epochs, est in estimates.items():
        assert est["method"] == "l1_norm" and est["epochs"] == epochs and est["batch_size"] == 8
        assert est["measured"]["batch_size"] == 8
        assert est["train_samples"] == 400
        assert est["steps_per_epoch"] == math.ceil(400 / 8)
        assert "method_factor = 1" in est["formula"]
        # recovery = epochs x steps per epoch x (one measured training step + one teacher
        # forward: recovery distils by default), rounded to ms
        step = est["measured"]["train_step_seconds"] + est["measured"]["eval_batch_seconds"]
        assert est["parts"]["recovery"] == pytest.approx(epochs * 50 * step, rel=0.02, abs=2e-3)
        assert est["total_seconds"] == pytest.approx(sum(est["parts"].values()), abs=1e-2)
    # Per measured step, 4 epochs cost twice what 2 do.
    per_step = {
        e: est["parts"]["recovery"]
        / (est["measured"]["train_step_seconds"] + est["measured"]["eval_batch_seconds"])
        for e, est in estimates.items()
    }
    assert per_step[4] == pytest.approx(2 * per_step[2], rel=0.05)


def test_analysis_without_a_spec_estimates_the_job_defaults(client, model_and_data):
    h, model_id = model_and_data["headers"], model_and_data["model_id"]
    r = client.post(
        f"/v1/models/{model_id}/analysis",
        headers=h,
        json={"dataset_id": model_and_data["dataset_id"]},
    )
    assert r.status_code == 202, r.text
    assert "spec" not in r.json()["params"]
    assert _run(client, r.json()["id"]) == "succeeded"
    est = client.get(f"/v1/models/{model_id}/analysis", headers=h).json()["result"]
    # 400 training samples: the default batch (null) halves 64 until an epoch has 40 steps: 16
    assert est["time_estimate"]["epochs"] == 3 and est["time_estimate"]["batch_size"] == 16


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"method": {"name": "no_such_method"}}, "no_such_method"),
        ({"method": {"name": "l1_norm", "params": {"bogus": 1}}}, "bogus"),
        ({"recovery": {"epochs": -1}}, "epochs"),
        ({"recovery": {"batch_size": 0}}, "batch_size"),
        ({"target": {}}, "target"),
        ({"gates": {"max_accuracy_drop": 1.0}}, "gates"),  # not part of the estimate
    ],
)
def test_a_bad_spec_is_refused_before_anything_is_queued(client, model_and_data, spec, words):
    model_id = model_and_data["model_id"]
    r = client.post(
        f"/v1/models/{model_id}/analysis", headers=model_and_data["headers"], json={"spec": spec}
    )
    assert r.status_code == 422, r.text
    assert words in r.text
    none = client.get(f"/v1/models/{model_id}/analysis", headers=model_and_data["headers"])
    assert none.status_code == 404  # no row was stored
