"""The event loop of LangOrch's processes (langorch_infra.loops): uvloop by default, asyncio's own on request,
and a precise error for anything else."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import uvloop

from langorch_infra import loops


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


@pytest.mark.unit
def test_uvloop_is_the_default_and_asyncio_can_be_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(loops.ENV, raising=False)
    assert loops.chosen() == "uvloop"
    assert issubclass(loops.run(_loop_type()), uvloop.Loop)
    monkeypatch.setenv(loops.ENV, "asyncio")
    ran = loops.run(_loop_type())
    assert not issubclass(ran, uvloop.Loop)
    assert issubclass(ran, asyncio.BaseEventLoop)
    monkeypatch.setenv(loops.ENV, " UVLOOP ")
    assert loops.chosen() == "uvloop"


@pytest.mark.unit
def test_an_unknown_loop_is_refused_naming_the_variable() -> None:
    with pytest.raises(ValueError, match="LANGORCH_EVENT_LOOP='tokio': expected 'uvloop' or 'asyncio'"):
        loops.chosen({"LANGORCH_EVENT_LOOP": "tokio"})
    assert loops.chosen({"LANGORCH_EVENT_LOOP": ""}) == "uvloop"


@pytest.mark.unit
def test_a_refused_choice_leaves_no_coroutine_unawaited() -> None:
    code = ("import os, warnings; warnings.simplefilter('error'); os.environ['LANGORCH_EVENT_LOOP'] = 'x'\n"
            "from langorch_infra import loops\n"
            "async def main(): pass\n"
            "try:\n    loops.run(main())\nexcept ValueError as e:\n    print('refused:', e)\n"
            "import gc; gc.collect()\n")
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "refused: LANGORCH_EVENT_LOOP='x'" in done.stdout
    assert "never awaited" not in done.stderr
