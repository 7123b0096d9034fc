"""A NATS cluster without a stream leader for a moment (a node lost, the others electing one) makes a publish fail
with "no response from stream" or JetStream's 503: the API answers 503 ``unavailable`` with ``Retry-After``, as for
NATS or PostgreSQL unreachable, never a 500 (found on the local cluster under load, issue 19)."""

from __future__ import annotations

import json

import pytest
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError
from starlette.requests import Request

from langorch_gateway.problems import internal_problem

pytestmark = pytest.mark.unit


def request() -> Request:
    return Request({"type": "http", "method": "POST", "path": "/api/runs", "headers": [], "query_string": b""})


@pytest.mark.parametrize("exc", [NoStreamResponseError(), ServiceUnavailableError(code=503)])
def test_a_stream_without_leader_is_unavailable(exc: Exception) -> None:
    answer = internal_problem(request(), exc)
    assert answer.status_code == 503
    assert answer.headers["Retry-After"] == "1"
    body = json.loads(answer.body)
    assert (body["code"], body["retryable"]) == ("unavailable", True)


def test_another_jetstream_error_stays_an_internal_error() -> None:
    answer = internal_problem(request(), APIError(code=400, description="bad request"))
    assert answer.status_code == 500
    assert json.loads(answer.body)["code"] == "internal_error"
