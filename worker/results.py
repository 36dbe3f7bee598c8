"""What a batch's or a pass's result holds: the answers a worker sends, built from what the
model made of each input. Pure: no sockets, no threads, no clock; worker/loop.py runs the model
and pushes what these build, and the simulator (tests/sim/peers.py) builds its results with them.

An input fails alone where it can: one that did not decode, or that prepare() or predict() gave
an Exception for, is answered with its own error, and the rest still run. predict() raising
fails every input of a batch (MODEL_ERROR); in a pass of several inputs, each PASS_FAILED (any of
them may be the culprit, and the broker runs them again one at a time). predict() returning the
wrong number of outputs fails every input BATCH_FAILED, which the broker never runs again.
"""

from __future__ import annotations

from typing import Any

from ddml_common import protocol
from ddml_common.protocol import ErrorCode
from worker.link import WorkBatch
from worker.models import InputError


def held_inputs(batch: WorkBatch, prepared: list) -> list[tuple[int, Any]]:
    """(position, value) of the inputs to hold, of prepare()'s values for those that decoded."""
    positions = [i for i in range(len(batch.inputs)) if i not in batch.errors]
    return [(i, value) for i, value in zip(positions, prepared) if not isinstance(value, Exception)]


def prepare_result(batch: WorkBatch, prepared: list, compute_ms: float) -> protocol.BatchResult | None:
    """The partial result that answers at once the inputs that failed to decode or to prepare
    (an Exception in prepare()'s slot), or None if none did."""
    failed: list[tuple[int, list]] = [(i, [ErrorCode.BAD_REQUEST.value, message]) for i, message in batch.errors.items()]
    positions = [i for i in range(len(batch.inputs)) if i not in batch.errors]
    failed.extend((i, _error_of(value)) for i, value in zip(positions, prepared) if isinstance(value, Exception))
    if not failed:
        return None
    failed.sort()
    return protocol.BatchResult(batch.batch_id, [b""] * len(failed),
                                errors=[[k, *error] for k, (_, error) in enumerate(failed)], compute_ms=compute_ms,
                                indices=[i for i, _ in failed])


class WrongOutputCount(RuntimeError):
    """predict() returned another number of outputs than it had inputs: a fault of the whole call,
    which each input would meet alone too. Its inputs are answered BATCH_FAILED, never re-run."""


def failed_pass(error: Exception, size: int) -> list:
    """The outcome of a pass of `size` inputs that raised `error`: PASS_FAILED for each input when
    it had company (any of them may be the culprit), MODEL_ERROR when alone; BATCH_FAILED for each
    when predict() returned the wrong number of outputs."""
    if isinstance(error, WrongOutputCount):
        return [FailedInput(ErrorCode.BATCH_FAILED, f"model failed: {error}"[:1000])] * size
    return [_PassFailed(f"{type(error).__name__}: {error}"[:1000], size > 1)] * size


class _PassFailed(Exception):
    def __init__(self, message: str, shared: bool):
        super().__init__(message)
        self.shared = shared  # the pass had other inputs: this one may be a bystander


class FailedInput(Exception):
    """An input prepare() failed as a whole batch: its code and message, as they go."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code


def _error_of(output: Exception) -> list:
    """[code, message] for an Exception in an output slot."""
    if isinstance(output, _PassFailed):
        code = ErrorCode.PASS_FAILED if output.shared else ErrorCode.MODEL_ERROR
        return [code.value, f"model failed: {output}"[:1000]]
    if isinstance(output, FailedInput):
        return [output.code.value, str(output)]
    code = ErrorCode.BAD_REQUEST if isinstance(output, InputError) else ErrorCode.MODEL_ERROR
    return [code.value, f"{type(output).__name__}: {output}"[:1000]]


def _encode_output(output: Any) -> tuple[bytes, list | None]:
    """An output as it travels, or b"" and [code, message] when it cannot: an Exception in its
    slot, or a value the protocol cannot encode."""
    if isinstance(output, Exception):
        return b"", _error_of(output)
    try:
        return protocol.encode_value(output), None
    except TypeError as error:
        return b"", [ErrorCode.MODEL_ERROR.value, f"output cannot travel: {error}"[:1000]]


def pass_results(running: list, outcome: list, compute_ms: float) -> list[tuple[WorkBatch, protocol.BatchResult]]:
    """What a pass's results hold: one partial result per batch the pass touched, in the order
    they were held. running: what the pass ran (each with .batch and .position); outcome: one
    output (or Exception) per input, as _run_pass() returns them."""
    by_batch: dict[int, list[tuple[Any, Any]]] = {}
    for held, output in zip(running, outcome):
        by_batch.setdefault(id(held.batch), []).append((held, output))
    answers = []
    for answered in by_batch.values():
        indices, outputs, errors = [], [], []
        for k, (held, output) in enumerate(answered):
            encoded, error = _encode_output(output)
            indices.append(held.position)
            outputs.append(encoded)
            if error is not None:
                errors.append([k, *error])
        batch = answered[0][0].batch
        answers.append((batch, protocol.BatchResult(batch.batch_id, outputs, errors=errors, compute_ms=compute_ms,
                                                    indices=indices, prepare_ms=batch.prepare_ms)))
    return answers


def batch_result(batch: WorkBatch, produced: list | Exception, compute_ms: float) -> protocol.BatchResult:
    """What a batch's result holds. produced: predict()'s outputs for the inputs that decoded (an
    Exception in a slot fails that input), or what predict() raised, which fails them all."""
    errors = [[i, ErrorCode.BAD_REQUEST.value, message] for i, message in batch.errors.items()]
    positions = [i for i in range(len(batch.inputs)) if i not in batch.errors]
    outputs = [b""] * len(batch.inputs)
    if isinstance(produced, Exception):
        message = f"model failed: {type(produced).__name__}: {produced}"[:1000]
        code = ErrorCode.BATCH_FAILED if isinstance(produced, WrongOutputCount) else ErrorCode.MODEL_ERROR
        errors.extend([i, code.value, message] for i in positions)
    else:
        for i, output in zip(positions, produced):
            outputs[i], error = _encode_output(output)
            if error is not None:
                errors.append([i, *error])
    return protocol.BatchResult(batch.batch_id, outputs, errors=sorted(errors), compute_ms=compute_ms)
