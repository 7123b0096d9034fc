"""The cross-service tests.

The suite starts many Python processes (pytest-xdist workers, runtime subprocesses, ``langorch`` commands), each
importing LangGraph, FastAPI and the services: compiling all that from source takes each of them about twice as long
as loading compiled bytecode. Where the environment turns bytecode files off (``PYTHONDONTWRITEBYTECODE``, often set
to keep ``__pycache__`` out of a work tree), this process and every process it starts keep them outside the work
tree instead, under ``$TMPDIR/langorch-test-pycache`` (``PYTHONPYCACHEPREFIX``). This package is imported before
``tests/conftest.py``, so before the services' modules.
"""

import os
import sys
import tempfile

if os.environ.get("PYTHONDONTWRITEBYTECODE") and not os.environ.get("PYTHONPYCACHEPREFIX"):
    _prefix = os.path.join(tempfile.gettempdir(), "langorch-test-pycache")
    del os.environ["PYTHONDONTWRITEBYTECODE"]
    os.environ["PYTHONPYCACHEPREFIX"] = _prefix
    sys.dont_write_bytecode = False
    sys.pycache_prefix = _prefix
