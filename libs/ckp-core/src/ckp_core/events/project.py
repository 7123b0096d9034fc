"""Events of the project aggregate (owned by the gateway)."""

from __future__ import annotations

from ckp_core.events.envelope import EventData


class ProjectCreated(EventData):
    TYPE = "project_created"
    AGGREGATE = "project"

    project_id: str
    name: str
    description: str | None = None


class ProjectUpdated(EventData):
    """The project's state after the change (every field, so the projection needs no history)."""

    TYPE = "project_updated"
    AGGREGATE = "project"

    project_id: str
    name: str
    description: str | None = None


class ProjectDeleted(EventData):
    TYPE = "project_deleted"
    AGGREGATE = "project"

    project_id: str


EVENTS: tuple[type[EventData], ...] = (ProjectCreated, ProjectUpdated, ProjectDeleted)
