"""``examples/simple_http_test.ckp.json`` end to end: its ``http_request`` step goes to the example agent
(``examples/agents/http_agent.py``, registered on the ``api`` channel), which really requests a posts API served
by the test; the logic node checks the answer and the run ends on the matching terminate."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from examples.agents.http_agent import create_app as http_agent_app
from tests.helpers import Platform, events_of, example, import_procedure, serve_app, start_run, wait_status

pytestmark = pytest.mark.integration

MISSING_POST = 42  # the posts API answers 404 for this one


@dataclass
class PostsApi:
    url: str = ""
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Accept

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/posts/{post_id}")
        async def post(post_id: int, request: Request) -> JSONResponse:
            self.requests.append((request.method, request.url.path, request.headers.get("accept")))
            if post_id == MISSING_POST:
                return JSONResponse({"error": "no such post"}, status_code=404)
            return JSONResponse({"userId": 1, "id": post_id, "title": f"Post {post_id}", "body": "..."})

        return app


@pytest.fixture
async def posts() -> AsyncIterator[PostsApi]:
    api = PostsApi()
    async with serve_app(api.app()) as url:
        api.url = url
        yield api


@pytest.fixture
async def http_agent(platform: Platform) -> AsyncIterator[str]:
    """The example agent, served and registered on the ``api`` channel (capabilities probed from it)."""
    async with serve_app(http_agent_app()) as url:
        r = await platform.client.post("/api/agents", json={"name": "http", "channel": "api", "base_url": url})
        assert r.status_code == 201, r.text
        assert [c["name"] for c in r.json()["capabilities"]] == ["http_request"]
        yield url


async def run_example(platform: Platform, inputs: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    c = platform.client
    detail = await import_procedure(c, example("simple_http_test.ckp.json"))
    assert (detail["procedure_id"], detail["version"]) == ("simple-http-test", "2.0.0")
    run = await wait_status(c, await start_run(c, "simple-http-test", inputs, version="2.0.0"), timeout=60)
    return run, await events_of(c, run["run_id"])


async def test_the_example_fetches_the_post_over_http_and_completes(platform: Platform, posts: PostsApi,
                                                                    http_agent: str) -> None:
    run, events = await run_example(platform, {"post_id": 7, "api_base_url": posts.url})
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"result": "ok", "post_id": 7, "title": "Post 7"}
    assert posts.requests == [("GET", "/posts/7", "application/json")]  # one real request, by the agent
    [started] = [e for e in events if e["event_type"] == "step_started"]
    assert (started["step_id"], started["payload"]["action"], started["payload"]["binding_kind"]) == (
        "get_post", "http_request", "agent_http")
    assert started["payload"]["params"]["url"] == f"{posts.url}/posts/7"
    [completed] = [e for e in events if e["event_type"] == "step_completed"]
    assert completed["attempt"] == 1
    assert [e["node_id"] for e in events if e["event_type"] == "node_started"] == [
        "fetch_post", "check_response", "success"]


async def test_a_missing_post_ends_on_the_failure_terminate(platform: Platform, posts: PostsApi,
                                                           http_agent: str) -> None:
    run, events = await run_example(platform, {"post_id": MISSING_POST, "api_base_url": posts.url})
    assert run["status"] == "failed", run
    assert (run["error"]["code"], run["error"]["node_id"]) == ("terminated_failed", "failure")
    [failed] = [e for e in events if e["event_type"] == "run_failed"]
    assert failed["payload"]["outputs"] == {"result": "unexpected_response", "status_code": 404}
    assert posts.requests == [("GET", f"/posts/{MISSING_POST}", "application/json")]
