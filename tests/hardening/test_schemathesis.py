"""schemathesis against the live server's own OpenAPI schema: no 5xx, no traceback, whatever it sends.

Cases are drawn per operation with hypothesis (schemathesis' own pytest plugin
does not load under this pytest).  Requests carry the admin token, so management
routes are exercised past auth (it is also accepted as an inference key).
DELETE is left out: the other tests use the adapters.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

pytestmark = pytest.mark.slow  # a live server or engine per module (tests/conftest.py: the tiers)

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def no_traceback(ctx, response, case) -> None:
    assert "Traceback" not in response.text, response.text


def test_no_operation_answers_5xx(main_server):
    schema = schemathesis.openapi.from_url(f"{main_server.url}/openapi.json").exclude(method="DELETE")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7

    for operation in operations:

        @FUZZ
        @given(case=operation.as_strategy())
        def fuzz(case):
            case.call_and_validate(
                base_url=main_server.url,
                headers=main_server.admin_headers(),
                checks=[not_a_server_error, no_traceback],
                timeout=120,
            )

        fuzz()
