"""/docs works offline (Swagger UI's assets come from the package) and /openapi.json tells a
client how to authenticate and what a report looks like."""

from __future__ import annotations

import pytest


def test_docs_assets_are_served_locally(client):
    page = client.get("/docs")
    assert page.status_code == 200
    assert (
        "cdn.jsdelivr" not in page.text and "unpkg" not in page.text and "https://" not in page.text
    )
    for asset in (
        "/docs-assets/swagger-ui-bundle.js",
        "/docs-assets/swagger-ui.css",
        "/docs-assets/favicon-32x32.png",
    ):
        assert asset in page.text
        r = client.get(asset)
        assert r.status_code == 200 and len(r.content) > 500, asset
    assert client.get("/redoc").status_code == 404  # ReDoc would need a CDN


def test_openapi_declares_bearer_auth_and_the_typed_report(client):
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": spec["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    public = {"/v1/methods", "/healthz", "/readyz", "/metrics"}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            needs = op.get("security") == [{"bearerAuth": []}]
            assert needs == (path not in public), (method, path)
    report = spec["paths"]["/v1/jobs/{job_id}/report"]["get"]["responses"]["200"]
    assert report["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Report"
    }
    schemas = spec["components"]["schemas"]
    assert {"layers", "excluded", "accuracy", "latency_ms"} <= set(schemas["Report"]["properties"])
    assert schemas["Report"]["properties"]["layers"]["items"] == {
        "$ref": "#/components/schemas/LayerRow"
    }
    assert "LayerRow" in schemas and "ExcludedLayer" in schemas
    # The features around a job are documented too.
    assert {
        "/v1/models/{model_id}/analysis",
        "/v1/jobs/{job_id}/webhooks",
        "/v1/jobs/{job_id}/report.html",
        "/v1/webhooks/secret",
    } <= set(spec["paths"])
    job_create = schemas["JobCreate"]["properties"]
    assert "webhook" in job_create


def test_sdk_upload_torch_exports_locally_and_uploads(client, tenant):
    import torch
    from torch import nn

    from prunery import Client

    sdk = Client("http://testserver", tenant["key"], transport=client._transport)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 64, 10),
    )
    net.train()
    model = sdk.models.upload_torch(net, torch.randn(2, 1, 8, 8), filename="digits.onnx")
    assert net.training  # the caller's mode is restored
    assert model.filename == "digits.onnx"
    assert model.inputs[0]["shape"] == ["batch", 1, 8, 8] and model.outputs[0]["shape"] == [
        "batch",
        10,
    ]
    assert {"Conv", "Gemm"} <= set(model.op_histogram)
    with pytest.raises(ValueError, match="single-input"):
        sdk.models.upload_torch(net, (torch.randn(1, 1, 8, 8), torch.randn(1)))
