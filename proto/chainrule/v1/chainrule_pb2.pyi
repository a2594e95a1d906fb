from google.rpc import error_details_pb2 as _error_details_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
    BOOL: _ClassVar[DType]

class Unreached(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UNREACHED_ZEROS: _ClassVar[Unreached]
    UNREACHED_OMIT: _ClassVar[Unreached]

class DiagnosticsMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIAGNOSTICS_FULL: _ClassVar[DiagnosticsMode]
    DIAGNOSTICS_OFF: _ClassVar[DiagnosticsMode]

class TensorEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_ENCODING_DATA: _ClassVar[TensorEncoding]
    TENSOR_ENCODING_VALUES: _ClassVar[TensorEncoding]

class CheckStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECK_NOT_RUN: _ClassVar[CheckStatus]
    CHECK_PASSED: _ClassVar[CheckStatus]
    CHECK_FAILED: _ClassVar[CheckStatus]

class DerivativeMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DERIVATIVE_MODE_REVERSE: _ClassVar[DerivativeMode]
    DERIVATIVE_MODE_FORWARD: _ClassVar[DerivativeMode]
DTYPE_UNSPECIFIED: DType
FLOAT64: DType
FLOAT32: DType
INT64: DType
INT32: DType
BOOL: DType
UNREACHED_ZEROS: Unreached
UNREACHED_OMIT: Unreached
DIAGNOSTICS_FULL: DiagnosticsMode
DIAGNOSTICS_OFF: DiagnosticsMode
TENSOR_ENCODING_DATA: TensorEncoding
TENSOR_ENCODING_VALUES: TensorEncoding
CHECK_NOT_RUN: CheckStatus
CHECK_PASSED: CheckStatus
CHECK_FAILED: CheckStatus
DERIVATIVE_MODE_REVERSE: DerivativeMode
DERIVATIVE_MODE_FORWARD: DerivativeMode

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "values", "shared_memory")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    values: DoubleList
    shared_memory: SharedMemoryRef
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., values: _Optional[_Union[DoubleList, _Mapping]] = ..., shared_memory: _Optional[_Union[SharedMemoryRef, _Mapping]] = ...) -> None: ...

class SharedMemoryRef(_message.Message):
    __slots__ = ("file", "offset", "byte_length")
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    file: str
    offset: int
    byte_length: int
    def __init__(self, file: _Optional[str] = ..., offset: _Optional[int] = ..., byte_length: _Optional[int] = ...) -> None: ...

class DoubleList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class Floats(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class Ints(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, values: _Optional[_Iterable[int]] = ...) -> None: ...

class AttrValue(_message.Message):
    __slots__ = ("f", "i", "s", "b", "floats", "ints", "tensor", "graph")
    F_FIELD_NUMBER: _ClassVar[int]
    I_FIELD_NUMBER: _ClassVar[int]
    S_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    FLOATS_FIELD_NUMBER: _ClassVar[int]
    INTS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    f: float
    i: int
    s: str
    b: bool
    floats: Floats
    ints: Ints
    tensor: Tensor
    graph: Graph
    def __init__(self, f: _Optional[float] = ..., i: _Optional[int] = ..., s: _Optional[str] = ..., b: _Optional[bool] = ..., floats: _Optional[_Union[Floats, _Mapping]] = ..., ints: _Optional[_Union[Ints, _Mapping]] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., graph: _Optional[_Union[Graph, _Mapping]] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("name", "op", "inputs", "attrs", "outputs")
    class AttrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: AttrValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[AttrValue, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    op: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    attrs: _containers.MessageMap[str, AttrValue]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., op: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., attrs: _Optional[_Mapping[str, AttrValue]] = ..., outputs: _Optional[_Iterable[str]] = ...) -> None: ...

class InputDecl(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Graph(_message.Message):
    __slots__ = ("inputs", "nodes", "outputs", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[InputDecl]
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, inputs: _Optional[_Iterable[_Union[InputDecl, _Mapping]]] = ..., nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ..., outputs: _Optional[_Iterable[str]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Selection(_message.Message):
    __slots__ = ("mode", "names")
    class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ALL: _ClassVar[Selection.Mode]
        NONE: _ClassVar[Selection.Mode]
        LISTED: _ClassVar[Selection.Mode]
    ALL: Selection.Mode
    NONE: Selection.Mode
    LISTED: Selection.Mode
    MODE_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    mode: Selection.Mode
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, mode: _Optional[_Union[Selection.Mode, str]] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("graph", "graph_id", "inputs", "output", "seed", "return_values", "return_grads", "unreached", "contributions", "input_sets", "shared_memory_output", "diagnostics", "response_encoding")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    RETURN_VALUES_FIELD_NUMBER: _ClassVar[int]
    RETURN_GRADS_FIELD_NUMBER: _ClassVar[int]
    UNREACHED_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SETS_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSTICS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_ENCODING_FIELD_NUMBER: _ClassVar[int]
    graph: Graph
    graph_id: str
    inputs: _containers.MessageMap[str, Tensor]
    output: str
    seed: Tensor
    return_values: Selection
    return_grads: Selection
    unreached: Unreached
    contributions: bool
    input_sets: _containers.RepeatedCompositeFieldContainer[Batch]
    shared_memory_output: str
    diagnostics: DiagnosticsMode
    response_encoding: TensorEncoding
    def __init__(self, graph: _Optional[_Union[Graph, _Mapping]] = ..., graph_id: _Optional[str] = ..., inputs: _Optional[_Mapping[str, Tensor]] = ..., output: _Optional[str] = ..., seed: _Optional[_Union[Tensor, _Mapping]] = ..., return_values: _Optional[_Union[Selection, _Mapping]] = ..., return_grads: _Optional[_Union[Selection, _Mapping]] = ..., unreached: _Optional[_Union[Unreached, str]] = ..., contributions: _Optional[bool] = ..., input_sets: _Optional[_Iterable[_Union[Batch, _Mapping]]] = ..., shared_memory_output: _Optional[str] = ..., diagnostics: _Optional[_Union[DiagnosticsMode, str]] = ..., response_encoding: _Optional[_Union[TensorEncoding, str]] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("output_value", "output", "values", "gradients", "no_gradient", "diagnostics", "graph_id", "contributions")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    class GradientsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    OUTPUT_VALUE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    NO_GRADIENT_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSTICS_FIELD_NUMBER: _ClassVar[int]
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    output_value: Tensor
    output: str
    values: _containers.MessageMap[str, Tensor]
    gradients: _containers.MessageMap[str, Tensor]
    no_gradient: _containers.RepeatedScalarFieldContainer[str]
    diagnostics: Diagnostics
    graph_id: str
    contributions: _containers.RepeatedCompositeFieldContainer[Contribution]
    def __init__(self, output_value: _Optional[_Union[Tensor, _Mapping]] = ..., output: _Optional[str] = ..., values: _Optional[_Mapping[str, Tensor]] = ..., gradients: _Optional[_Mapping[str, Tensor]] = ..., no_gradient: _Optional[_Iterable[str]] = ..., diagnostics: _Optional[_Union[Diagnostics, _Mapping]] = ..., graph_id: _Optional[str] = ..., contributions: _Optional[_Iterable[_Union[Contribution, _Mapping]]] = ...) -> None: ...

class Contribution(_message.Message):
    __slots__ = ("node", "consumer", "input_index", "gradient")
    NODE_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    INPUT_INDEX_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    node: str
    consumer: str
    input_index: int
    gradient: Tensor
    def __init__(self, node: _Optional[str] = ..., consumer: _Optional[str] = ..., input_index: _Optional[int] = ..., gradient: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Diagnostics(_message.Message):
    __slots__ = ("first_nonfinite_value", "first_nonfinite_gradient", "grad_norms", "flags")
    FIRST_NONFINITE_VALUE_FIELD_NUMBER: _ClassVar[int]
    FIRST_NONFINITE_GRADIENT_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORMS_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    first_nonfinite_value: NonFinite
    first_nonfinite_gradient: NonFinite
    grad_norms: _containers.RepeatedCompositeFieldContainer[GradNorm]
    flags: _containers.RepeatedCompositeFieldContainer[Flag]
    def __init__(self, first_nonfinite_value: _Optional[_Union[NonFinite, _Mapping]] = ..., first_nonfinite_gradient: _Optional[_Union[NonFinite, _Mapping]] = ..., grad_norms: _Optional[_Iterable[_Union[GradNorm, _Mapping]]] = ..., flags: _Optional[_Iterable[_Union[Flag, _Mapping]]] = ...) -> None: ...

class NonFinite(_message.Message):
    __slots__ = ("node", "op", "count", "inputs_summary", "consumers_summary")
    NODE_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    INPUTS_SUMMARY_FIELD_NUMBER: _ClassVar[int]
    CONSUMERS_SUMMARY_FIELD_NUMBER: _ClassVar[int]
    node: str
    op: str
    count: int
    inputs_summary: str
    consumers_summary: str
    def __init__(self, node: _Optional[str] = ..., op: _Optional[str] = ..., count: _Optional[int] = ..., inputs_summary: _Optional[str] = ..., consumers_summary: _Optional[str] = ...) -> None: ...

class GradNorm(_message.Message):
    __slots__ = ("node", "grad_norm", "value_norm")
    NODE_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    VALUE_NORM_FIELD_NUMBER: _ClassVar[int]
    node: str
    grad_norm: float
    value_norm: float
    def __init__(self, node: _Optional[str] = ..., grad_norm: _Optional[float] = ..., value_norm: _Optional[float] = ...) -> None: ...

class Flag(_message.Message):
    __slots__ = ("kind", "node", "message")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    node: str
    message: str
    def __init__(self, kind: _Optional[str] = ..., node: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class RegisterGraphRequest(_message.Message):
    __slots__ = ("graph",)
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    graph: Graph
    def __init__(self, graph: _Optional[_Union[Graph, _Mapping]] = ...) -> None: ...

class RegisterGraphResponse(_message.Message):
    __slots__ = ("graph_id", "node_count")
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_COUNT_FIELD_NUMBER: _ClassVar[int]
    graph_id: str
    node_count: int
    def __init__(self, graph_id: _Optional[str] = ..., node_count: _Optional[int] = ...) -> None: ...

class ListOperatorsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListOperatorsResponse(_message.Message):
    __slots__ = ("operators",)
    OPERATORS_FIELD_NUMBER: _ClassVar[int]
    operators: _containers.RepeatedCompositeFieldContainer[OperatorInfo]
    def __init__(self, operators: _Optional[_Iterable[_Union[OperatorInfo, _Mapping]]] = ...) -> None: ...

class OperatorInfo(_message.Message):
    __slots__ = ("name", "arity", "attrs", "doc", "plugin", "distribution", "version", "check", "inputs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARITY_FIELD_NUMBER: _ClassVar[int]
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    PLUGIN_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECK_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    arity: int
    attrs: _containers.RepeatedCompositeFieldContainer[AttrSchema]
    doc: str
    plugin: str
    distribution: str
    version: str
    check: CheckStatus
    inputs: _containers.RepeatedCompositeFieldContainer[InputSchema]
    def __init__(self, name: _Optional[str] = ..., arity: _Optional[int] = ..., attrs: _Optional[_Iterable[_Union[AttrSchema, _Mapping]]] = ..., doc: _Optional[str] = ..., plugin: _Optional[str] = ..., distribution: _Optional[str] = ..., version: _Optional[str] = ..., check: _Optional[_Union[CheckStatus, str]] = ..., inputs: _Optional[_Iterable[_Union[InputSchema, _Mapping]]] = ...) -> None: ...

class InputSchema(_message.Message):
    __slots__ = ("name", "dtypes", "variadic")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    VARIADIC_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtypes: _containers.RepeatedScalarFieldContainer[DType]
    variadic: bool
    def __init__(self, name: _Optional[str] = ..., dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., variadic: _Optional[bool] = ...) -> None: ...

class AttrSchema(_message.Message):
    __slots__ = ("name", "type", "default_value", "required", "doc")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    default_value: AttrValue
    required: bool
    doc: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., default_value: _Optional[_Union[AttrValue, _Mapping]] = ..., required: _Optional[bool] = ..., doc: _Optional[str] = ...) -> None: ...

class ServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfoResponse(_message.Message):
    __slots__ = ("version", "pid", "worker", "shared_memory_dir")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_DIR_FIELD_NUMBER: _ClassVar[int]
    version: str
    pid: int
    worker: int
    shared_memory_dir: str
    def __init__(self, version: _Optional[str] = ..., pid: _Optional[int] = ..., worker: _Optional[int] = ..., shared_memory_dir: _Optional[str] = ...) -> None: ...

class EvaluateStreamResponse(_message.Message):
    __slots__ = ("response", "error", "index", "results")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    response: EvaluateResponse
    error: _status_pb2.Status
    index: int
    results: _containers.RepeatedCompositeFieldContainer[EvaluateStreamResponse]
    def __init__(self, response: _Optional[_Union[EvaluateResponse, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., index: _Optional[int] = ..., results: _Optional[_Iterable[_Union[EvaluateStreamResponse, _Mapping]]] = ...) -> None: ...

class Optimizer(_message.Message):
    __slots__ = ("kind", "learning_rate", "momentum", "beta1", "beta2", "epsilon")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    learning_rate: float
    momentum: float
    beta1: float
    beta2: float
    epsilon: float
    def __init__(self, kind: _Optional[str] = ..., learning_rate: _Optional[float] = ..., momentum: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., epsilon: _Optional[float] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("inputs",)
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.MessageMap[str, Tensor]
    def __init__(self, inputs: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class OptimizeRequest(_message.Message):
    __slots__ = ("graph", "graph_id", "parameters", "initial", "fixed_inputs", "batches", "loss", "optimizer", "steps", "target_loss", "report_every", "report_interval_seconds")
    class InitialEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    class FixedInputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_FIELD_NUMBER: _ClassVar[int]
    FIXED_INPUTS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TARGET_LOSS_FIELD_NUMBER: _ClassVar[int]
    REPORT_EVERY_FIELD_NUMBER: _ClassVar[int]
    REPORT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    graph: Graph
    graph_id: str
    parameters: _containers.RepeatedScalarFieldContainer[str]
    initial: _containers.MessageMap[str, Tensor]
    fixed_inputs: _containers.MessageMap[str, Tensor]
    batches: _containers.RepeatedCompositeFieldContainer[Batch]
    loss: str
    optimizer: Optimizer
    steps: int
    target_loss: float
    report_every: int
    report_interval_seconds: float
    def __init__(self, graph: _Optional[_Union[Graph, _Mapping]] = ..., graph_id: _Optional[str] = ..., parameters: _Optional[_Iterable[str]] = ..., initial: _Optional[_Mapping[str, Tensor]] = ..., fixed_inputs: _Optional[_Mapping[str, Tensor]] = ..., batches: _Optional[_Iterable[_Union[Batch, _Mapping]]] = ..., loss: _Optional[str] = ..., optimizer: _Optional[_Union[Optimizer, _Mapping]] = ..., steps: _Optional[int] = ..., target_loss: _Optional[float] = ..., report_every: _Optional[int] = ..., report_interval_seconds: _Optional[float] = ...) -> None: ...

class OptimizeProgress(_message.Message):
    __slots__ = ("step", "loss", "grad_norms", "elapsed_seconds", "done", "parameters", "losses", "target_reached", "stopped_early", "stop_reason")
    class GradNormsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORMS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    TARGET_REACHED_FIELD_NUMBER: _ClassVar[int]
    STOPPED_EARLY_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    grad_norms: _containers.ScalarMap[str, float]
    elapsed_seconds: float
    done: bool
    parameters: _containers.MessageMap[str, Tensor]
    losses: _containers.RepeatedScalarFieldContainer[float]
    target_reached: bool
    stopped_early: bool
    stop_reason: str
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ..., grad_norms: _Optional[_Mapping[str, float]] = ..., elapsed_seconds: _Optional[float] = ..., done: _Optional[bool] = ..., parameters: _Optional[_Mapping[str, Tensor]] = ..., losses: _Optional[_Iterable[float]] = ..., target_reached: _Optional[bool] = ..., stopped_early: _Optional[bool] = ..., stop_reason: _Optional[str] = ...) -> None: ...

class DeriveRequest(_message.Message):
    __slots__ = ("graph", "graph_id", "output", "wrt", "mode", "seed")
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    graph: Graph
    graph_id: str
    output: str
    wrt: _containers.RepeatedScalarFieldContainer[str]
    mode: DerivativeMode
    seed: bool
    def __init__(self, graph: _Optional[_Union[Graph, _Mapping]] = ..., graph_id: _Optional[str] = ..., output: _Optional[str] = ..., wrt: _Optional[_Iterable[str]] = ..., mode: _Optional[_Union[DerivativeMode, str]] = ..., seed: _Optional[bool] = ...) -> None: ...

class DeriveResponse(_message.Message):
    __slots__ = ("graph", "graph_id", "output", "seed_input", "gradients", "tangents", "tangent_output")
    class GradientsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class TangentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SEED_INPUT_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    TANGENTS_FIELD_NUMBER: _ClassVar[int]
    TANGENT_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    graph: Graph
    graph_id: str
    output: str
    seed_input: str
    gradients: _containers.ScalarMap[str, str]
    tangents: _containers.ScalarMap[str, str]
    tangent_output: str
    def __init__(self, graph: _Optional[_Union[Graph, _Mapping]] = ..., graph_id: _Optional[str] = ..., output: _Optional[str] = ..., seed_input: _Optional[str] = ..., gradients: _Optional[_Mapping[str, str]] = ..., tangents: _Optional[_Mapping[str, str]] = ..., tangent_output: _Optional[str] = ...) -> None: ...
