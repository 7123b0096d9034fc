"""The operator console under ``/ui`` (api.md §17): server-rendered pages over the public API."""

from langorch_gateway.ui.routes import router

__all__ = ["router"]
