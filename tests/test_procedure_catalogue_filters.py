"""api.md §1.4, §4.2: GET /api/procedures filters, search, latest_only, sort, order and exact totals."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.helpers import Platform, platform_of, procedure_doc

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def catalogue(module_nats_url: str, module_database_url: str) -> AsyncIterator[tuple[Platform, str]]:
    """One catalogue for the whole module (read-only tests): 5 versions of 3 procedures, one project."""
    async with platform_of(module_nats_url, module_database_url, runtime=False) as p:
        c = p.client
        project = (await c.post("/api/projects", json={"name": "Catalogue"})).json()["project_id"]
        docs: list[tuple[dict[str, Any], str | None]] = [
            (procedure_doc("invoice_flow", "1.0.0", name="Invoice flow", description="Pays supplier invoices",
                           retrieval_metadata={"tags": ["finance", "eu"], "domain": "accounts payable",
                                               "keywords": ["vendor"], "note": "50%_off"}), project),
            (procedure_doc("invoice_flow", "2.0.0", name="Invoice flow",
                           retrieval_metadata={"tags": ["finance"], "intents": ["approve invoices"]}), project),
            (procedure_doc("hr_onboard", "1.0.0", name="Onboarding", description="New hire set-up",
                           retrieval_metadata={"tags": ["hr", "eu"]}), None),
            (procedure_doc("alpha_check", "0.1.0", name="Alpha check"), None),
            (procedure_doc("alpha_check", "0.2.0", name="Alpha check"), None),
        ]
        for doc, project_id in docs:
            r = await c.post("/api/procedures", json={"ckp_json": doc, "project_id": project_id})
            assert r.status_code == 201, r.text
        assert (await c.patch("/api/procedures/invoice_flow/1.0.0/status", json={"status": "active"})).status_code \
            == 200
        r = await c.post("/api/procedures/alpha_check/0.2.0/promote", json={"target_channel": "qa"})
        assert r.status_code == 200, r.text
        yield p, project


async def ids(c: httpx.AsyncClient, **params: Any) -> list[str]:
    r = await c.get("/api/procedures", params=params)
    assert r.status_code == 200, r.text
    page = r.json()
    assert page["total"] >= len(page["items"])
    return [f"{p['procedure_id']}@{p['version']}" for p in page["items"]]


async def test_default_order_is_newest_first_with_exact_total(catalogue: tuple[Platform, str]) -> None:
    c = catalogue[0].client
    page = (await c.get("/api/procedures")).json()
    assert page["total"] == 5
    assert (page["limit"], page["offset"]) == (100, 0)
    assert [f"{p['procedure_id']}@{p['version']}" for p in page["items"]] == [
        "alpha_check@0.2.0", "alpha_check@0.1.0", "hr_onboard@1.0.0", "invoice_flow@2.0.0", "invoice_flow@1.0.0"]
    item = page["items"][0]
    assert set(item) == {
        "procedure_id", "version", "name", "description", "status", "effective_date", "release_channel",
        "promoted_from_version", "promoted_at", "promoted_by", "project_id", "tags", "content_hash",
        "compiler_version", "diagnostics_summary", "has_trigger", "revision", "created_at", "created_by",
        "updated_at"}
    second = (await c.get("/api/procedures", params={"limit": 2, "offset": 2})).json()
    assert [p["version"] for p in second["items"]] == ["1.0.0", "2.0.0"]
    assert second["total"] == 5
    past = (await c.get("/api/procedures", params={"offset": 10})).json()
    assert (past["items"], past["total"]) == ([], 5)


async def test_filters(catalogue: tuple[Platform, str]) -> None:
    c, project = catalogue[0].client, catalogue[1]
    assert await ids(c, project_id=project) == ["invoice_flow@2.0.0", "invoice_flow@1.0.0"]
    assert await ids(c, status="active") == ["alpha_check@0.2.0", "invoice_flow@1.0.0"]
    assert await ids(c, status="active,draft", procedure_id="invoice_flow") == [
        "invoice_flow@2.0.0", "invoice_flow@1.0.0"]
    assert await ids(c, release_channel="qa") == ["alpha_check@0.2.0"]
    assert await ids(c, tags="eu") == ["hr_onboard@1.0.0", "invoice_flow@1.0.0"]
    assert await ids(c, tags="finance,eu") == ["invoice_flow@1.0.0"]  # all listed tags must be present
    assert await ids(c, tags="finance,hr") == []


async def test_search_and_metadata_search(catalogue: tuple[Platform, str]) -> None:
    c = catalogue[0].client
    assert await ids(c, search="SUPPLIER") == ["invoice_flow@1.0.0"]  # description, case-insensitive
    assert await ids(c, search="onboarding") == ["hr_onboard@1.0.0"]  # name
    assert await ids(c, search="payable") == ["invoice_flow@1.0.0"]  # retrieval domain
    assert await ids(c, search="approve invoices") == ["invoice_flow@2.0.0"]  # intents
    assert await ids(c, search="vendor") == ["invoice_flow@1.0.0"]  # keywords
    assert await ids(c, search="alpha_") == ["alpha_check@0.2.0", "alpha_check@0.1.0"]  # id
    assert await ids(c, search="50%") == []  # `note` is not a searched member
    assert await ids(c, metadata_search="50%_off") == ["invoice_flow@1.0.0"]
    assert await ids(c, metadata_search="5_%") == []  # wildcards match only themselves
    assert await ids(c, metadata_search='"hr"') == ["hr_onboard@1.0.0"]


async def test_latest_only_sort_and_order(catalogue: tuple[Platform, str]) -> None:
    c = catalogue[0].client
    assert await ids(c, latest_only="true") == ["alpha_check@0.2.0", "hr_onboard@1.0.0", "invoice_flow@2.0.0"]
    latest = (await c.get("/api/procedures", params={"latest_only": "true", "limit": 1})).json()
    assert latest["total"] == 3
    assert await ids(c, latest_only="true", status="active") == ["alpha_check@0.2.0", "invoice_flow@1.0.0"]
    assert await ids(c, sort="procedure_id", order="asc") == [
        "alpha_check@0.1.0", "alpha_check@0.2.0", "hr_onboard@1.0.0", "invoice_flow@1.0.0", "invoice_flow@2.0.0"]
    assert await ids(c, sort="name", order="desc", latest_only="true") == [
        "hr_onboard@1.0.0", "invoice_flow@2.0.0", "alpha_check@0.2.0"]
    assert await ids(c, sort="created_at", order="asc", limit=2) == ["invoice_flow@1.0.0", "invoice_flow@2.0.0"]


@pytest.mark.parametrize(("params", "field"), [
    ({"limit": 0}, "query.limit"), ({"limit": 501}, "query.limit"), ({"offset": -1}, "query.offset"),
    ({"sort": "version"}, "query.sort"), ({"order": "sideways"}, "query.order"),
    ({"status": "active,gone"}, "query.status"), ({"release_channel": "staging"}, "query.release_channel"),
    ({"latest_only": "maybe"}, "query.latest_only"),
])
async def test_bad_query_parameters_are_422(catalogue: tuple[Platform, str], params: dict[str, Any],
                                            field: str) -> None:
    r = await catalogue[0].client.get("/api/procedures", params=params)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["code"] == "validation_failed"
    assert list(body["errors"]) == [field]
