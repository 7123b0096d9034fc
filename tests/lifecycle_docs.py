"""CKP documents for the catalogue and lifecycle tests: small valid procedures with chosen identities."""

from __future__ import annotations

import copy
from typing import Any

from tests.helpers import example


def procedure_doc(procedure_id: str, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
    """minimal_greeting with another identity and optional top-level members (name, retrieval_metadata …)."""
    doc = copy.deepcopy(example("minimal_greeting.ckp.json"))
    doc["procedure_id"] = procedure_id
    doc["version"] = version
    doc.update(extra)
    return doc
