"""Property-based fuzzing of the live API from its own `/openapi.json` (schemathesis): whatever request is
generated for whichever operation, the server answers, and never with a 5xx. Bounded examples per operation
keep it fast; valid chat bodies get `max_tokens` capped so that they do not generate at length."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402

EXAMPLES = 25


def cap_generation(case: Any) -> None:
    if isinstance(case.body, dict):
        for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            if isinstance(case.body.get(field), int):
                case.body[field] = max(1, min(case.body[field], 8))
        if isinstance(case.body.get("n"), int):
            case.body["n"] = max(1, min(case.body["n"], 2))


def test_no_generated_request_makes_the_server_fail(base_url: str, api_key: str) -> None:
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert any(op.path == "/v1/chat/completions" for op in operations)
    statuses: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case: Any) -> None:
            cap_generation(case)
            response = case.call(headers={"Authorization": f"Bearer {api_key}"}, timeout=120)
            statuses.append(response.status_code)
            case.validate_response(response, checks=(not_a_server_error,))

        fuzz()
    assert len(statuses) >= 5 * len(operations), statuses  # the fuzzing really ran
    assert any(s == 200 for s in statuses) and any(400 <= s < 500 for s in statuses)
