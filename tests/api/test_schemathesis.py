"""Property-based tier: schemathesis generates requests for every operation of the OpenAPI
schema and sends them to the app (in process) against the real Postgres and Redis. No
answer may be a 5xx. Bounded: PRUNERY_SCHEMATHESIS_EXAMPLES examples per operation
(default 25; `make test-schemathesis` runs 200)."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

pytestmark = pytest.mark.schemathesis

EXAMPLES = int(os.environ.get("PRUNERY_SCHEMATHESIS_EXAMPLES", "25"))


def _runner(operation, auth: dict[str, str], server_errors: list[str]):  # type: ignore[no-untyped-def]
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    @given(case=operation.as_strategy())
    def run(case):  # type: ignore[no-untyped-def]
        response = case.call(headers=auth)
        if response.status_code >= 500:
            server_errors.append(
                f"{operation.method.upper()} {operation.path} -> {response.status_code}: "
                f"{response.text[:200]}\n    {case.as_curl_command()[:400]}"
            )

    return run


def test_no_operation_answers_5xx(client, new_tenant):  # type: ignore[no-untyped-def]
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    auth = new_tenant()["headers"]
    server_errors: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operations += 1
        _runner(result.ok(), auth, server_errors)()
    assert operations >= 15
    assert not server_errors, "\n".join(server_errors[:20])
