"""What the tests of deploy/ share: the Grafana dashboard builder, loaded from its file (deploy/ is no package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def _load_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("langorch_grafana_build", ROOT / "deploy" / "grafana" / "build.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


BUILDER = _load_builder()
DASHBOARDS = BUILDER.DASHBOARDS
