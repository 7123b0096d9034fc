"""The operator console under ``/ui`` (api.md §17): server-rendered pages over the public API."""

from langorch_gateway.ui import trigger_tab, version_tabs
from langorch_gateway.ui.routes import router

router.include_router(trigger_tab.router)  # a version's trigger and explain tabs (modules of their own)
router.include_router(version_tabs.router)

__all__ = ["router"]
