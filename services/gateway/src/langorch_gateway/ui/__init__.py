"""The operator console under ``/ui`` (api.md §17): server-rendered pages over the public API."""

from fastapi import APIRouter

from langorch_gateway.ui import admin, run_views, trigger_tab, version_tabs
from langorch_gateway.ui.routes import router as pages

router = APIRouter(include_in_schema=False)
router.include_router(run_views.router)  # first: its /ui/runs/{id}/usage comes before the pages' /ui/runs/{id}/{tab}
router.include_router(pages)
router.include_router(trigger_tab.router)  # a version's trigger and explain tabs (modules of their own)
router.include_router(version_tabs.router)
router.include_router(admin.router)  # settings: users and API keys

__all__ = ["router"]
