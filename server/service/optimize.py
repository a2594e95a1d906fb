"""The Optimize RPC's domain logic: an OptimizeRequest in, OptimizeProgress messages out.

No gRPC here: the servicer streams what :func:`optimize` yields, and the
in-process client iterates the same generator, so both return bitwise-equal
parameters. The loop itself is ``chainrule.core.training``.
"""
from __future__ import annotations

import logging
import math
from typing import Iterator

import numpy as np

from chainrule.core import StopToken
from chainrule.core.errors import GraphError, LimitExceeded, MissingInputError, OptionError, UnexpectedInputError
from chainrule.core.optim import Optimizer, make_optimizer
from chainrule.core.training import Report, training
from chainrule.v1 import chainrule_pb2 as pb
from chainrule.wire.convert import DTYPE_TO_NUMPY, array_to_tensor, check_element_count, tensor_to_array
from chainrule.wire.shared_memory import check_total

from .service import ChainruleService

log = logging.getLogger("chainrule.server.service.optimize")


def optimize(service: ChainruleService, request: pb.OptimizeRequest, token: StopToken | None = None,
             request_id: str = "") -> Iterator[pb.OptimizeProgress]:
    """Check and compile the request, then train, yielding every report as a message.

    Everything is checked before the first step. A run that ``token``'s deadline (the
    client's, or the server's max_training_seconds) would cut short stops in time and
    ends with a final message marked ``stopped_early`` (see ``core.training``); a
    cancelled or failed run raises and yields no final message.
    """
    _, plan = service.plan_for(request, token)  # type: ignore[arg-type]  (same graph/graph_id oneof as EvaluateRequest)
    limit = service.limits.max_tensor_elements

    tensors = _request_tensors(request)
    check_total((t for _, _, t in tensors), service.limits.max_memory_bytes, "initial, fixed_inputs and batches")
    _check_decoded_size(tensors, len(request.batches), limit, service.limits.max_memory_bytes)

    def decode(tensor: pb.Tensor, field: str) -> np.ndarray:
        return tensor_to_array(tensor, field=field, max_elements=limit, shared_memory=service.shared_memory)

    params = {}
    for name in request.parameters:
        if name in params:
            raise OptionError(f"parameters: '{name}' is listed twice", node=name, field="parameters")
        if name not in request.initial:
            raise MissingInputError(f"initial.{name}: parameter '{name}' has no initial value", node=name,
                                    field=f"initial.{name}")
        params[name] = decode(request.initial[name], f"initial.{name}")
    for name in request.initial:
        if name not in params:
            raise UnexpectedInputError(f"initial.{name}: '{name}' is not listed in parameters", node=name,
                                       field=f"initial.{name}")
    fixed = {name: decode(t, f"fixed_inputs.{name}") for name, t in request.fixed_inputs.items()}
    batches = []
    for i, batch in enumerate(request.batches):
        if token is not None and i % 1024 == 0:
            token.check()  # a million small batches take seconds to decode
        batches.append({name: decode(t, f"batches[{i}].inputs.{name}") for name, t in batch.inputs.items()})
    reports = training(
        plan, params, optimizer=optimizer_from_proto(request), steps=request.steps, loss=request.loss or None,
        fixed=fixed, batches=batches, report_every=request.report_every,
        report_seconds=request.report_interval_seconds, token=token,
        target_loss=request.target_loss if request.HasField("target_loss") else None,
    )
    for report in reports:
        log.debug("optimize id=%s step=%d loss=%.6g", request_id, report.step, report.loss)
        yield progress_message(report)


#: What one decoded tensor, and one batch, cost in Python objects beyond the elements (numpy array,
#: dict entries, the per-step feed): a batch of two scalars measures about 690 bytes.
TENSOR_OBJECT_BYTES = BATCH_OBJECT_BYTES = 256


def _request_tensors(request: pb.OptimizeRequest) -> list[tuple[str, str, pb.Tensor]]:
    """Every tensor of the request as (where, name, tensor); a field path is spelt only for an error."""
    return [*(("initial.", k, t) for k, t in request.initial.items()),
            *(("fixed_inputs.", k, t) for k, t in request.fixed_inputs.items()),
            *((f"batches[{i}].inputs.", k, t) for i, b in enumerate(request.batches) for k, t in b.inputs.items())]


def _check_decoded_size(tensors: list[tuple[str, str, pb.Tensor]], batches: int, max_elements: int,
                        allowed: int) -> None:
    """Refuse, before decoding, tensors and batches that would take more than the memory budget
    once decoded (a scalar batch is a few bytes on the wire and several hundred in memory); a
    tensor over the per-tensor limit is named on its own first."""
    elements_bytes = 0
    for where, name, tensor in tensors:
        shape = tuple(tensor.shape)
        count = math.prod(shape) if all(n >= 0 for n in shape) else 0  # a bad shape is refused when decoded
        if count > max_elements:
            check_element_count(shape, count, max_elements, where + name)
        dtype = DTYPE_TO_NUMPY.get(tensor.dtype)
        elements_bytes += count * (dtype.itemsize if dtype is not None else 8)
    estimate = elements_bytes + TENSOR_OBJECT_BYTES * len(tensors) + BATCH_OBJECT_BYTES * batches
    if estimate > allowed:
        raise LimitExceeded(
            f"batches: {len(tensors)} tensors in {batches} batches and the rest would take about {estimate} "
            f"bytes once decoded; the memory budget per request is {allowed} (max_memory_bytes)",
            limit="max_memory_bytes", requested=estimate, allowed=allowed, field="batches")


def optimizer_from_proto(request: pb.OptimizeRequest) -> Optimizer:
    if not request.HasField("optimizer"):
        raise GraphError("optimizer: not set; give kind 'sgd' or 'adam' and a learning_rate", field="optimizer")
    o = request.optimizer
    return make_optimizer(
        o.kind, lr=o.learning_rate, momentum=o.momentum,
        beta1=o.beta1 if o.HasField("beta1") else None, beta2=o.beta2 if o.HasField("beta2") else None,
        eps=o.epsilon if o.HasField("epsilon") else None,
    )


def progress_message(report: Report) -> pb.OptimizeProgress:
    message = pb.OptimizeProgress(
        step=report.step, loss=report.loss, grad_norms=report.grad_norms, elapsed_seconds=report.elapsed,
        done=report.done, losses=report.losses, target_reached=report.target_reached,
        stopped_early=report.stopped_early, stop_reason=report.stop_reason,
    )
    for name, value in (report.params or {}).items():
        message.parameters[name].CopyFrom(array_to_tensor(value))
    return message
