"""Property-based tier: schemathesis generates requests for every operation of the OpenAPI
schema and sends them to the app (in process) against the real Postgres and Redis. No
answer may be a 5xx. Bounded: PRUNERY_SCHEMATHESIS_EXAMPLES examples per operation
(default 25; `make test-schemathesis` runs 200)."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

pytestmark = pytest.mark.schemathesis

EXAMPLES = int(os.environ.get("PRUNERY_SCHEMATHESIS_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def api_schema(client):  # type: ignore[no-untyped-def]
    return schemathesis.openapi.from_asgi("/openapi.json", client.app)


@pytest.fixture(scope="module")
def auth(new_tenant) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return new_tenant()["headers"]


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_operation_answers_5xx(case, auth):  # type: ignore[no-untyped-def]
    case.call_and_validate(headers=auth, checks=[not_a_server_error])
