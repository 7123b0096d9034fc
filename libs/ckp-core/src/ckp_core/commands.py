"""Command bodies published on ``LO_CMD`` (one pydantic model per message)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from ckp_core.events import Actor
from ckp_core.ids import new_id


class Command(BaseModel):
    model_config = ConfigDict(extra="allow")

    AGGREGATE: ClassVar[str]
    VERB: ClassVar[str]

    command_id: str = Field(default_factory=new_id)
    actor: Actor
    causation_id: str | None = None


class ImportProcedure(Command):
    """``lo.cmd.procedure.import``: compile and store a procedure version."""

    AGGREGATE = "procedure"
    VERB = "import"

    ckp_json: dict[str, Any]
    project_id: str | None = None


class StartRun(Command):
    """``lo.cmd.run.start``: execute a created run (its ``run_created`` event is already appended)."""

    AGGREGATE = "run"
    VERB = "start"

    run_id: str
