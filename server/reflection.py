"""gRPC server reflection, both versions, with the contract's comments.

grpcio-reflection (1.85) implements only ``grpc.reflection.v1alpha``
(grpc/grpc#38576), while current tools (grpcurl, buf curl, grpc-java) ask
``grpc.reflection.v1`` first. The two protocols are the same messages under
another package name, so one servicer, grpcio-reflection's own, answers both:

* v1alpha is registered as grpcio-reflection registers it;
* v1 is a generic handler at ``/grpc.reflection.v1.ServerReflection/ServerReflectionInfo``
  that reads and writes v1alpha's messages, which is exact because v1's
  descriptor is v1alpha's with only its names changed (:func:`v1_file`, added
  to the default descriptor pool so that reflection also describes itself).

Descriptors come from the process's descriptor pool, and generated ``_pb2``
modules carry no comments (protoc drops ``source_code_info`` from them). So
``proto/generate.py`` also writes ``chainrule.binpb``, the contract's
descriptor with its comments, and :class:`ReflectionServicer` answers with it
instead of the bare one whenever the two agree in everything but comments
(otherwise, with a warning, it serves the bare one). The google.rpc and
google.protobuf files are served as the installed packages have them, without
comments.
"""
from __future__ import annotations

import importlib
import logging
from importlib import resources
from typing import Any, Iterable, Iterator

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection as v1alpha_reflection
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

# The contract, and with it the google.rpc error details it imports, in the pool reflection serves.
from chainrule.v1 import chainrule_pb2  # noqa: F401

log = logging.getLogger("chainrule.server")

V1ALPHA_SERVICE_NAME = v1alpha_reflection.SERVICE_NAME
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
#: The file the official v1 protocol is defined in (grpc-proto: grpc/reflection/v1/reflection.proto).
V1_FILE = "grpc/reflection/v1/reflection.proto"
#: The contract's descriptor with its comments, written by proto/generate.py beside the stubs.
DOCUMENTED_DESCRIPTOR = "chainrule.binpb"


def v1_file() -> descriptor_pb2.FileDescriptorProto:
    """``grpc/reflection/v1/reflection.proto``: v1alpha's descriptor under v1's names and options."""
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    old, new = f".{file.package}.", ".grpc.reflection.v1."
    file.name, file.package = V1_FILE, "grpc.reflection.v1"
    for message in file.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name[len(old):]
    for service in file.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old):]
            method.output_type = new + method.output_type[len(old):]
    file.options.Clear()  # v1alpha's are deprecated=true and its own package names
    file.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    file.options.java_multiple_files = True
    file.options.java_package = "io.grpc.reflection.v1"
    file.options.java_outer_classname = "ServerReflectionProto"
    return file


def _add_v1_to(pool: descriptor_pool.DescriptorPool) -> None:
    try:  # a grpcio-reflection that has v1 adds the official file itself: never build a rival one
        importlib.import_module("grpc_reflection.v1.reflection_pb2")
    except ImportError:
        pass
    try:
        pool.FindFileByName(V1_FILE)  # already there (that, another library, or an earlier server)
    except KeyError:
        pool.AddSerializedFile(v1_file().SerializeToString())


def _bare(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """``file`` without what protoc adds beyond the generated stubs: comments and JSON names."""
    bare = descriptor_pb2.FileDescriptorProto()
    bare.CopyFrom(file)
    bare.ClearField("source_code_info")
    messages = list(bare.message_type)
    while messages:
        message = messages.pop()
        messages.extend(message.nested_type)
        for field in (*message.field, *message.extension):
            field.ClearField("json_name")
    return bare


def documented_files(pool: descriptor_pool.DescriptorPool, data: bytes | None = None) -> dict[bytes, bytes]:
    """Serialized bare descriptor -> the same with comments, for each file of the descriptor set ``data``
    (default: the committed ``chainrule.binpb``) that agrees with ``pool`` in everything but comments."""
    if data is None:
        try:
            data = resources.files("chainrule.v1").joinpath(DOCUMENTED_DESCRIPTOR).read_bytes()
        except OSError:
            log.warning("reflection: %s is missing; descriptors are served without comments", DOCUMENTED_DESCRIPTOR)
            return {}
    swaps: dict[bytes, bytes] = {}
    for file in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        served = descriptor_pb2.FileDescriptorProto()
        try:
            pool.FindFileByName(file.name).CopyToProto(served)
        except KeyError:
            continue
        if _bare(file) != served:
            log.warning("reflection: %s differs from the stubs (run proto/generate.py); "
                        "serving %s without comments", DOCUMENTED_DESCRIPTOR, file.name)
            continue
        # The base servicer serializes exactly so, which makes the bytes a key.
        swaps[served.SerializeToString()] = file.SerializeToString()
    return swaps


class ReflectionServicer(v1alpha_reflection.ReflectionServicer):
    """grpcio-reflection's servicer, answering with the documented descriptor of the contract."""

    def __init__(self, service_names: Iterable[str], pool: descriptor_pool.DescriptorPool | None = None) -> None:
        super().__init__(service_names, pool=pool)
        self._swaps = documented_files(self._pool)

    def ServerReflectionInfo(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        for response in super().ServerReflectionInfo(request_iterator, context):
            if self._swaps and response.HasField("file_descriptor_response"):
                files = response.file_descriptor_response.file_descriptor_proto
                swapped = [self._swaps.get(file, file) for file in files]
                del files[:]
                files.extend(swapped)
            yield response


def enable_server_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    """Serve reflection v1 and v1alpha on ``server``; both list ``service_names`` and themselves."""
    pool = descriptor_pool.Default()
    _add_v1_to(pool)
    names = {*service_names, V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME}
    servicer = ReflectionServicer(names, pool=pool)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        ),
    }),))
