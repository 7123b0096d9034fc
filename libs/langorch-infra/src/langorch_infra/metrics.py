"""Prometheus helpers shared by the services (api.md §13.1): build info, and one registry made of several.

Each service keeps its own ``CollectorRegistry``. ``langorch up`` runs every service in one process and serves
one ``/metrics``: :class:`CombinedCollector` exposes the families of several registries as one, merging
families of the same name (``langorch_build_info`` once, with one sample per ``service`` label).
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence

from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.metrics_core import Metric

from ckp_core.events import EventEnvelope
from langorch_infra.jetstream import JetStreamEventStore

log = logging.getLogger(__name__)


def package_version(distribution: str) -> str:
    """The installed version of a workspace package (``0.0.0`` when it is not installed as one)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def register_build_info(registry: CollectorRegistry, service: str, version: str) -> None:
    """``langorch_build_info{service, version} 1`` in ``registry``."""
    Gauge("langorch_build_info", "Build of this process.", ["service", "version"], registry=registry).labels(
        service=service, version=version).set(1)


class CombinedCollector:
    """The metric families of several registries as one set: families of one name are merged, and a sample
    that two registries both have (same name and labels) is kept once, from the first registry."""

    def __init__(self, registries: Sequence[CollectorRegistry]) -> None:
        self.registries = list(registries)

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
        for registry in self.registries:
            for family in registry.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                            family.unit)
                for sample in family.samples:
                    identity = (sample.name, tuple(sorted(sample.labels.items())))
                    if identity not in seen:
                        seen.add(identity)
                        merged.samples.append(sample)
        return list(families.values())


def combined_registry(registries: Sequence[CollectorRegistry]) -> CollectorRegistry:
    """A registry whose exposition is the merge of ``registries`` (read at every scrape)."""
    combined = CollectorRegistry(auto_describe=False)
    combined.register(CombinedCollector(registries))
    return combined


class ObservedEventStore(JetStreamEventStore):
    """The event store, reporting each event after this replica appended it: counters derived from the events a
    service writes itself match its timeline and stay per process (api.md §13.1)."""

    def __init__(self, js: JetStreamContext, observe: Callable[[EventEnvelope], Awaitable[None]]) -> None:
        super().__init__(js)
        self.observe = observe

    async def append(self, events: Sequence[EventEnvelope], *, expected_position: int) -> list[int]:
        positions = await super().append(events, expected_position=expected_position)
        for event in events:
            try:
                await self.observe(event)
            except Exception:  # a metric must never fail an append that landed
                log.warning("metrics observer failed on %s", event.type, exc_info=True)
        return positions
