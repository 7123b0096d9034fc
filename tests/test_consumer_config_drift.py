"""A durable command consumer that already exists with another configuration (an older release's ack wait or
filter, or one changed by hand) is brought to the configuration the service declares when the service starts.

nats-py's pull subscribe (which FastStream uses) binds to an existing durable consumer as it is, so without this
the difference would stay hidden, as it did when the compiler swallowed every error of ``add_consumer``."""

from __future__ import annotations

import asyncio
import contextlib

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from ckp_core.subjects import COMMAND_STREAM
from langorch_compiler.service import CONSUMER, CompilerService
from langorch_infra.jetstream import ensure_topology
from langorch_infra.settings import CompilerSettings

pytestmark = pytest.mark.integration


async def test_a_drifted_compiler_consumer_is_updated_to_the_declared_configuration(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_topology(js)
    await js.add_consumer(COMMAND_STREAM, ConsumerConfig(
        durable_name=CONSUMER, ack_policy=AckPolicy.EXPLICIT, ack_wait=5, filter_subject="lo.cmd.procedure.import"))
    service = CompilerService(CompilerSettings(nats_url=nats_url))
    await service.start()
    running = asyncio.create_task(service.run())
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            config = (await js.consumer_info(COMMAND_STREAM, CONSUMER)).config
            if (config.ack_wait, config.filter_subject) == (30, "lo.cmd.procedure.>"):
                break
            assert asyncio.get_running_loop().time() < deadline, f"the consumer kept {config}"
            await asyncio.sleep(0.1)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await service.stop()
        await nc.close()

