from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class QueryEnvelope(_message.Message):
    __slots__ = ("query", "analyst", "nonce", "issued_at_ms", "expires_at_ms", "analyst_certificate", "signature_algorithm", "signature")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    ANALYST_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    ANALYST_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    query: bytes
    analyst: str
    nonce: bytes
    issued_at_ms: int
    expires_at_ms: int
    analyst_certificate: bytes
    signature_algorithm: str
    signature: bytes
    def __init__(self, query: _Optional[bytes] = ..., analyst: _Optional[str] = ..., nonce: _Optional[bytes] = ..., issued_at_ms: _Optional[int] = ..., expires_at_ms: _Optional[int] = ..., analyst_certificate: _Optional[bytes] = ..., signature_algorithm: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ColumnInfo(_message.Message):
    __slots__ = ("name", "type", "domain", "description", "person_level")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PERSON_LEVEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    domain: _containers.RepeatedScalarFieldContainer[str]
    description: str
    person_level: bool
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., domain: _Optional[_Iterable[str]] = ..., description: _Optional[str] = ..., person_level: _Optional[bool] = ...) -> None: ...

class ViewInfo(_message.Message):
    __slots__ = ("name", "description", "columns", "max_rows_per_person")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_PER_PERSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    columns: _containers.RepeatedCompositeFieldContainer[ColumnInfo]
    max_rows_per_person: int
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., columns: _Optional[_Iterable[_Union[ColumnInfo, _Mapping]]] = ..., max_rows_per_person: _Optional[int] = ...) -> None: ...

class BudgetStatus(_message.Message):
    __slots__ = ("rho_total", "rho_spent", "rho_remaining", "max_rho_per_query", "delta")
    RHO_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RHO_SPENT_FIELD_NUMBER: _ClassVar[int]
    RHO_REMAINING_FIELD_NUMBER: _ClassVar[int]
    MAX_RHO_PER_QUERY_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    rho_total: float
    rho_spent: float
    rho_remaining: float
    max_rho_per_query: float
    delta: float
    def __init__(self, rho_total: _Optional[float] = ..., rho_spent: _Optional[float] = ..., rho_remaining: _Optional[float] = ..., max_rho_per_query: _Optional[float] = ..., delta: _Optional[float] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("node", "protocol_version", "views", "budget")
    NODE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    node: str
    protocol_version: str
    views: _containers.RepeatedCompositeFieldContainer[ViewInfo]
    budget: BudgetStatus
    def __init__(self, node: _Optional[str] = ..., protocol_version: _Optional[str] = ..., views: _Optional[_Iterable[_Union[ViewInfo, _Mapping]]] = ..., budget: _Optional[_Union[BudgetStatus, _Mapping]] = ...) -> None: ...

class ExecuteRequest(_message.Message):
    __slots__ = ("envelope",)
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    envelope: QueryEnvelope
    def __init__(self, envelope: _Optional[_Union[QueryEnvelope, _Mapping]] = ...) -> None: ...

class NoiseInfo(_message.Message):
    __slots__ = ("mechanism", "scale", "variance", "sensitivity")
    MECHANISM_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    VARIANCE_FIELD_NUMBER: _ClassVar[int]
    SENSITIVITY_FIELD_NUMBER: _ClassVar[int]
    mechanism: str
    scale: float
    variance: float
    sensitivity: float
    def __init__(self, mechanism: _Optional[str] = ..., scale: _Optional[float] = ..., variance: _Optional[float] = ..., sensitivity: _Optional[float] = ...) -> None: ...

class ExecuteResponse(_message.Message):
    __slots__ = ("query_id", "table", "noise", "rho_charged", "epsilon", "budget")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    RHO_CHARGED_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    table: bytes
    noise: NoiseInfo
    rho_charged: float
    epsilon: float
    budget: BudgetStatus
    def __init__(self, query_id: _Optional[str] = ..., table: _Optional[bytes] = ..., noise: _Optional[_Union[NoiseInfo, _Mapping]] = ..., rho_charged: _Optional[float] = ..., epsilon: _Optional[float] = ..., budget: _Optional[_Union[BudgetStatus, _Mapping]] = ...) -> None: ...
