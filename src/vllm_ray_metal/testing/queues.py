"""A connected pair of vLLM message queues in one process (writer, reader), for tests of
what the executor's reply reads rely on."""

from __future__ import annotations

import threading


def queue_pair():
    """vLLM's shared-memory MessageQueue with one local reader, both ends ready."""
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue

    writer = MessageQueue(n_reader=1, n_local_reader=1)
    reader = MessageQueue.create_from_handle(writer.export_handle(), 0)
    ready = threading.Thread(target=writer.wait_until_ready)
    ready.start()
    reader.wait_until_ready()
    ready.join()
    return writer, reader
