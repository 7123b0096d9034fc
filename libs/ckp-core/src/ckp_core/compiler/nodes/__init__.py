"""Node payloads (ckp.md §3): one compiler per node type, chosen by the node's ``type``.

Each takes the compilation, the node's context (id, type, path, channel) and its fields (comments and nulls
dropped) and returns the payload, or None when an error was reported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ckp_core.compiler.fields import Compilation, NodeContext
from ckp_core.compiler.nodes.human_approval import node_human_approval
from ckp_core.compiler.nodes.llm_action import node_llm_action
from ckp_core.compiler.nodes.routing import node_logic, node_loop, node_parallel
from ckp_core.compiler.nodes.subflow import node_subflow
from ckp_core.compiler.nodes.transform import node_transform
from ckp_core.compiler.nodes.work import node_processing, node_sequence, node_terminate, node_verification
from ckp_core.ir import Payload

PAYLOADS: dict[str, Callable[[Compilation, NodeContext, dict[str, Any]], Payload | None]] = {
    "sequence": node_sequence,
    "logic": node_logic,
    "loop": node_loop,
    "parallel": node_parallel,
    "subflow": node_subflow,
    "processing": node_processing,
    "verification": node_verification,
    "llm_action": node_llm_action,
    "human_approval": node_human_approval,
    "transform": node_transform,
    "terminate": node_terminate,
}
