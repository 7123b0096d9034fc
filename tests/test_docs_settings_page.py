"""The configuration page's settings reference (``tools/docs/settings_page.py``, a MkDocs hook) lists every field
of every settings class with its environment variable, never a secret's value, and fails when a field has no
description."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType

import pytest
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from langorch_infra import settings as settings_module

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
HOOK = ROOT / "tools" / "docs" / "settings_page.py"
PAGE = ROOT / "docs" / "operations" / "configuration.md"


def _hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("langorch_docs_settings_page", HOOK)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _settings_classes() -> list[type[BaseSettings]]:
    return [obj for obj in vars(settings_module).values()
            if inspect.isclass(obj) and issubclass(obj, BaseSettings) and obj.__module__ == settings_module.__name__]


def test_every_field_of_every_settings_class_is_on_the_page() -> None:
    page = _hook().render_page(PAGE.read_text(encoding="utf-8"))
    classes = _settings_classes()
    assert {c.__name__ for c in classes} >= {"CommonSettings", "CompilerSettings", "RuntimeSettings",
                                              "ApprovalsSettings", "GatewaySettings"}
    for cls in classes:
        assert f"`{cls.__name__}`" in page, cls.__name__
        for name in cls.model_fields:
            env = f"{cls.model_config.get('env_prefix', '')}{name}".upper()
            assert f"| `{env}` |" in page, f"{cls.__name__}.{name} ({env}) is missing"


def test_nested_model_fields_are_on_the_page() -> None:
    page = _hook().render_settings_reference()
    for name in settings_module.LlmModelConfig.model_fields:
        assert f"| `{name}` |" in page, name


def test_secret_values_never_appear() -> None:
    page = _hook().render_settings_reference()
    for cls in _settings_classes():
        for name, field in cls.model_fields.items():
            default = field.get_default(call_default_factory=True)
            if isinstance(default, SecretStr):
                assert default.get_secret_value() not in page, f"{cls.__name__}.{name} shows its value"


def test_design_document_references_are_dropped() -> None:
    page = _hook().render_settings_reference()
    assert "§" not in page
    assert ".md" not in page


def test_the_placeholder_is_required() -> None:
    hook = _hook()
    with pytest.raises(hook.SettingsPageError, match="placeholder"):
        hook.render_page("# Configuration\n\nno placeholder here\n")


def test_a_field_without_description_fails() -> None:
    hook = _hook()

    class UndocumentedSettings(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="LANGORCH_")

        documented: int = Field(1, description="Has one.")
        undocumented: int = 2

    module = ModuleType("fake_settings")
    UndocumentedSettings.__module__ = module.__name__
    module.UndocumentedSettings = UndocumentedSettings  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    hook.SETTINGS_MODULE = module.__name__
    try:
        with pytest.raises(hook.SettingsPageError, match=r"UndocumentedSettings\.undocumented has no description"):
            hook.render_settings_reference()
    finally:
        del sys.modules[module.__name__]
