"""Compiler metrics (api.md §13.1): every compile the service runs (import, replace, re-compile on activation
and promotion), by outcome, with its duration."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from ckp_core.compiler import CompileResult, compile_document
from langorch_infra.metrics import package_version, register_build_info

VERSION = package_version("langorch-compiler")
DURATION_BUCKETS = (.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)


class CompilerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        register_build_info(r, "compiler", VERSION)
        self.compiles = Counter("langorch_compile_total", "CKP compiles by outcome (success|failure)", ["outcome"],
                                registry=r)
        self.duration = Histogram("langorch_compile_duration_seconds", "Duration of one CKP compile",
                                  buckets=DURATION_BUCKETS, registry=r)

    def compile(self, document: Any) -> CompileResult:
        """``compile_document``, counted and timed."""
        started = time.perf_counter()
        result = compile_document(document)
        self.duration.observe(time.perf_counter() - started)
        self.compiles.labels(outcome="success" if result.ir is not None else "failure").inc()
        return result
