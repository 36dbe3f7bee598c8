"""The compute side of a worker: take a batch, run the model, push the result. Never raises."""

from __future__ import annotations

import logging
import queue
import time
from typing import Callable

import zmq

from ddml_common import protocol
from ddml_common.protocol import ErrorCode
from ddml_common.sockets import send_frames
from worker.connection import ComputeState, WorkBatch
from worker.models import InputError, Manager

logger = logging.getLogger(__name__)


def run_worker(
    model: Manager,
    inbox: queue.Queue,
    results: zmq.Socket,
    state: ComputeState,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Serve batches from the I/O thread until it puts None in the inbox. The model runs here."""
    while True:
        batch = inbox.get()
        if batch is None:
            return
        state.busy_since = started_at = clock()
        result = run_batch(model, batch, clock)
        state.busy_since = None
        state.batches += 1
        state.items += len(batch.inputs)
        state.compute_s += clock() - started_at
        send_frames(results, [batch.tag, *protocol.encode(result)], dontwait=False)


def run_batch(model: Manager, batch: WorkBatch, clock: Callable[[], float] = time.monotonic) -> protocol.BatchResult:
    """Run one batch. A failure becomes errors in the result: one per input, or for the whole batch."""
    started_at = clock()
    size = len(batch.inputs)
    if logger.isEnabledFor(logging.DEBUG):
        request_ids = _request_ids(batch)
        logger.debug("batch %d: %d inputs of requests %s", batch.batch_id, size, request_ids,
                     extra={"batch_id": batch.batch_id, "request_id": request_ids})
    errors = [[i, ErrorCode.BAD_REQUEST.value, message] for i, message in batch.errors.items()]
    positions = [i for i in range(size) if i not in batch.errors]
    outputs = [b""] * size
    if positions:
        try:
            produced = model.predict([batch.inputs[i] for i in positions])
            if len(produced) != len(positions):
                raise RuntimeError(f"predict() returned {len(produced)} outputs for {len(positions)} inputs")
        except Exception as error:
            request_ids = _request_ids(batch)
            logger.exception("batch %d of %d inputs failed (requests %s)", batch.batch_id, len(positions), request_ids,
                             extra={"batch_id": batch.batch_id, "request_id": request_ids})
            message = f"model failed: {type(error).__name__}: {error}"[:1000]
            errors.extend([i, ErrorCode.MODEL_ERROR.value, message] for i in positions)
            produced = []
        for i, output in zip(positions, produced):
            if isinstance(output, Exception):
                code = ErrorCode.BAD_REQUEST if isinstance(output, InputError) else ErrorCode.MODEL_ERROR
                errors.append([i, code.value, f"{type(output).__name__}: {output}"[:1000]])
                continue
            try:
                outputs[i] = protocol.encode_value(output)
            except TypeError as error:
                errors.append([i, ErrorCode.MODEL_ERROR.value, f"output cannot travel: {error}"[:1000]])
    return protocol.BatchResult(
        batch.batch_id, outputs, errors=sorted(errors), compute_ms=(clock() - started_at) * 1000
    )


def _request_ids(batch: WorkBatch) -> str:
    """The requests a batch serves, each once, in batch order: what its log lines carry."""
    return ",".join(dict.fromkeys(batch.request_ids))
