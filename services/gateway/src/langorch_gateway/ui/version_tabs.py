"""A version's **Explain** tab (api.md §17).

It is the API's static analysis (``POST /api/procedures/{id}/{version}/explain``, any role): required and
missing inputs, the route the given inputs would take, external calls and policies. Its inputs come from the form
generated from ``variables_schema`` and travel in the URL (a GET form), so an explanation is a link one can share.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from langorch_gateway.ui import forms
from langorch_gateway.ui.console import Console, form_errors, page, path_id, problem_of

router = APIRouter(include_in_schema=False)


@router.get("/ui/procedures/{procedure_id}/{version}/explain")
async def explain_tab(request: Request, procedure_id: str, version: str) -> Response:
    """What the version needs and does; with inputs in the query (``var.<name>``), the route they would take."""
    query = {k: v for k, v in request.query_params.items()}

    async def build(ui: Console) -> Response:
        path = f"/api/procedures/{path_id(procedure_id)}/{path_id(version)}"
        detail = await ui.get(path)
        fields = forms.fields_of(detail.get("variables_schema"))
        inputs, errors = forms.input_vars(fields, query)
        explained = problem = None
        if not errors:
            answer = await ui.send("POST", f"{path}/explain", {"input_vars": inputs}, csrf=ui.csrf)
            if answer.status_code == 200:
                explained = answer.json()
            else:
                problem = problem_of(answer)
                errors = form_errors(problem)
        if explained and inputs:  # with no inputs given, every required one would be an error
            errors = explained["input_errors"]
        return ui.render("explain.html", 200 if explained else 422, detail=detail, fields=fields, submitted=query,
                         errors=errors, explained=explained, problem=problem, asked=bool(inputs), tab="explain",
                         title=f"{procedure_id} {version}: explain")

    return await page(request, build)
