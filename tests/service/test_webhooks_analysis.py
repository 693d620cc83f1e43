"""Through the running service (uvicorn + Celery worker + Postgres + Redis): signed webhook
deliveries to a real local receiver (retried after a 500), refused addresses, the analysis
job, the HTML report, and the analysis a budget_unreachable job keeps."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from e2ekit import spec, wait_for

from prunery.errors import APIError
from prunery.webhooks import InvalidSignature, verify


class Receiver:
    """A real HTTP server on 127.0.0.1 that answers 500 to its first `fail_first` requests."""

    def __init__(self, fail_first: int = 1) -> None:
        self.received: list[tuple[dict[str, str], bytes, int]] = []
        self.fail_first = fail_first
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                code = 500 if len(outer.received) < outer.fail_first else 200
                outer.received.append((dict(self.headers.items()), body, code))
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/prunery"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.service
def test_webhooks_signed_retried_and_logged(sdk, uploaded):
    secret = sdk.webhooks.secret()
    assert secret.startswith("whsec_") and sdk.webhooks.secret() == secret
    with Receiver(fail_first=1) as rx:
        job = sdk.jobs.create(
            spec(uploaded, webhook={"url": rx.url, "events": ["running", "succeeded"]})
        )
        job.wait(timeout=300)
        assert job.status == "succeeded"
        deliveries = wait_for(
            lambda: (
                (d := job.webhooks())
                and len(d) == 2
                and all(x["status"] == "delivered" for x in d)
                and d
            ),
            timeout=60,
        )
    assert [d["event"] for d in deliveries] == ["running", "succeeded"]
    # The first request got a 500 and was retried (with backoff) until it got a 200.
    codes = sorted([a["status_code"] for a in d["attempts"]] for d in deliveries)
    assert codes == [[200], [500, 200]]
    assert len(rx.received) == 3 and [c for _, _, c in rx.received] == [500, 200, 200]
    for headers, body, _ in rx.received:
        sent = verify(body, headers["X-Prunery-Signature"], secret)
        assert sent["id"] == job.id and sent["status"] == headers["X-Prunery-Event"]
        assert headers["Content-Type"] == "application/json"
        with pytest.raises(InvalidSignature):
            verify(body.replace(b'"status"', b'"statuS"'), headers["X-Prunery-Signature"], secret)
        with pytest.raises(InvalidSignature):
            verify(body, headers["X-Prunery-Signature"], "whsec_wrong")
    final = [json.loads(b) for h, b, _ in rx.received if h["X-Prunery-Event"] == "succeeded"][-1]
    assert final["status"] == "succeeded" and "model.onnx" in final["artifacts"]
    # A retry sends the same body, signed afresh.
    retried = [d for d in deliveries if len(d["attempts"]) == 2][0]["event"]
    bodies = [b for h, b, _ in rx.received if h["X-Prunery-Event"] == retried]
    assert len(bodies) == 2 and bodies[0] == bodies[1]


@pytest.mark.service
@pytest.mark.parametrize(
    "url",
    [
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://192.168.0.10:8080/",
        "http://[fd00::1]/x",
        "http://0.0.0.0:80/",
    ],
)
def test_webhook_to_a_refused_address_is_rejected_at_submit(sdk, uploaded, url):
    with pytest.raises(APIError) as err:
        sdk.jobs.create(spec(uploaded, webhook={"url": url}))
    assert err.value.status == 422 and err.value.code == "webhook_url_refused"
    assert "address" in err.value.detail


def test_delivery_time_check_refuses_without_sending(tmp_path):
    """A host that passed at submit but resolves to a refused address later (DNS rebinding)
    gets no request: the worker checks again before every attempt."""
    from core.orm import WebhookDelivery, utcnow
    from core.webhooks import WebhookSettings, attempt_delivery, finish_attempt

    with Receiver(fail_first=0) as rx:
        d = WebhookDelivery(
            id="whd_test",
            job_id="job_x",
            tenant_id="ten_x",
            event="succeeded",
            url=rx.url,
            status="pending",
            payload="{}",
            attempts=[],
            attempt_count=0,
        )
        strict = WebhookSettings(allowed_networks="")
        record = attempt_delivery(d, "whsec_x", strict)
        assert record["refused"] and "loopback" in record["error"]
        finish_attempt(d, record, strict, utcnow())
        assert d.status == "refused" and d.next_attempt_at is None
        time.sleep(0.2)
        assert rx.received == []
        allowed = WebhookSettings(allowed_networks="127.0.0.0/8")
        record = attempt_delivery(d, "whsec_x", allowed)
        assert record["status_code"] == 200 and len(rx.received) == 1
    with pytest.raises(ValueError, match="development"):
        WebhookSettings(allowed_networks="127.0.0.0/8", environment="production")


@pytest.mark.service
def test_analysis_job_report_html_and_budget_unreachable(sdk, uploaded, stack):
    model, data = uploaded["model"], uploaded["data"]
    a = sdk.models.analyze(model.id, data.id, timeout=240)
    assert a.groups and a.excluded and 0 < a.min_macs_fraction < 1
    assert any(m.name == "l1_norm" and m.applies for m in a.methods)
    assert sdk._http.get(f"/v1/models/{model.id}/analysis").json()["status"] == "succeeded"

    job = sdk.jobs.create(spec(uploaded))
    job.wait(timeout=300)
    assert {"report.html", "analysis.json"} <= set(job.artifacts)
    html = job.report_html()
    assert html.startswith("<!DOCTYPE html>") and 'data-plot="layer-channels"' in html
    r = httpx.get(f"{stack.url}/v1/jobs/{job.id}/report.html")
    assert r.status_code == 401
    r = sdk._http.get(f"/v1/jobs/{job.id}/report.html")
    assert r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]

    doomed = sdk.jobs.create(spec(uploaded, target={"flops": 0.001}))
    doomed.wait(timeout=300, raise_on_failure=False)
    assert doomed.status == "failed" and doomed.error.error == "budget_unreachable"
    assert doomed.artifacts == ["analysis.json"]
    body = sdk._http.get(f"/v1/jobs/{doomed.id}/artifacts/analysis.json").json()
    assert body["excluded"] and all(e["reason"] for e in body["excluded"])
    assert json.dumps(body).count("min_macs_fraction") == 1
