from protocols.v1 import node_pb2 as _node_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitRequest(_message.Message):
    __slots__ = ("envelope", "deadline_ms")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    envelope: _node_pb2.QueryEnvelope
    deadline_ms: int
    def __init__(self, envelope: _Optional[_Union[_node_pb2.QueryEnvelope, _Mapping]] = ..., deadline_ms: _Optional[int] = ...) -> None: ...

class NodeOutcome(_message.Message):
    __slots__ = ("node", "status", "message", "rho_charged", "noise_variance", "budget", "latency_ms")
    NODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RHO_CHARGED_FIELD_NUMBER: _ClassVar[int]
    NOISE_VARIANCE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    node: str
    status: str
    message: str
    rho_charged: float
    noise_variance: float
    budget: _node_pb2.BudgetStatus
    latency_ms: float
    def __init__(self, node: _Optional[str] = ..., status: _Optional[str] = ..., message: _Optional[str] = ..., rho_charged: _Optional[float] = ..., noise_variance: _Optional[float] = ..., budget: _Optional[_Union[_node_pb2.BudgetStatus, _Mapping]] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("query_id", "table", "nodes", "partial")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    table: bytes
    nodes: _containers.RepeatedCompositeFieldContainer[NodeOutcome]
    partial: bool
    def __init__(self, query_id: _Optional[str] = ..., table: _Optional[bytes] = ..., nodes: _Optional[_Iterable[_Union[NodeOutcome, _Mapping]]] = ..., partial: _Optional[bool] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes", "unavailable")
    NODES_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[_node_pb2.DescribeResponse]
    unavailable: _containers.RepeatedCompositeFieldContainer[NodeOutcome]
    def __init__(self, nodes: _Optional[_Iterable[_Union[_node_pb2.DescribeResponse, _Mapping]]] = ..., unavailable: _Optional[_Iterable[_Union[NodeOutcome, _Mapping]]] = ...) -> None: ...
