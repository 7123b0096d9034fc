"""The operator console under ``/ui`` (api.md §17): server-rendered pages over the public API."""

from langorch_gateway.ui import trigger_tab
from langorch_gateway.ui.routes import router

router.include_router(trigger_tab.router)  # a version's trigger tab (its own module: the page is large)

__all__ = ["router"]
