from protos.splitserve.v1 import attention_pb2 as _attention_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Attach(_message.Message):
    __slots__ = ("worker_id", "layout", "kv_head_start", "kv_head_end", "num_blocks", "ipc", "local", "adopt", "adopt_from")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    KV_HEAD_START_FIELD_NUMBER: _ClassVar[int]
    KV_HEAD_END_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    IPC_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    ADOPT_FIELD_NUMBER: _ClassVar[int]
    ADOPT_FROM_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    layout: str
    kv_head_start: int
    kv_head_end: int
    num_blocks: int
    ipc: _containers.RepeatedCompositeFieldContainer[_attention_pb2.IpcLink]
    local: bool
    adopt: bool
    adopt_from: str
    def __init__(self, worker_id: _Optional[str] = ..., layout: _Optional[str] = ..., kv_head_start: _Optional[int] = ..., kv_head_end: _Optional[int] = ..., num_blocks: _Optional[int] = ..., ipc: _Optional[_Iterable[_Union[_attention_pb2.IpcLink, _Mapping]]] = ..., local: _Optional[bool] = ..., adopt: _Optional[bool] = ..., adopt_from: _Optional[str] = ...) -> None: ...

class PrefillChunk(_message.Message):
    __slots__ = ("query_start", "num_query", "seq_len", "table")
    QUERY_START_FIELD_NUMBER: _ClassVar[int]
    NUM_QUERY_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    query_start: int
    num_query: int
    seq_len: int
    table: bytes
    def __init__(self, query_start: _Optional[int] = ..., num_query: _Optional[int] = ..., seq_len: _Optional[int] = ..., table: _Optional[bytes] = ...) -> None: ...

class StepLayout(_message.Message):
    __slots__ = ("tag", "num_decode", "slot_mapping", "decode_table", "table_width", "decode_lens", "prefills", "q_first", "cached_blocks", "cached_hashes")
    TAG_FIELD_NUMBER: _ClassVar[int]
    NUM_DECODE_FIELD_NUMBER: _ClassVar[int]
    SLOT_MAPPING_FIELD_NUMBER: _ClassVar[int]
    DECODE_TABLE_FIELD_NUMBER: _ClassVar[int]
    TABLE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    DECODE_LENS_FIELD_NUMBER: _ClassVar[int]
    PREFILLS_FIELD_NUMBER: _ClassVar[int]
    Q_FIRST_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CACHED_HASHES_FIELD_NUMBER: _ClassVar[int]
    tag: int
    num_decode: int
    slot_mapping: bytes
    decode_table: bytes
    table_width: int
    decode_lens: bytes
    prefills: _containers.RepeatedCompositeFieldContainer[PrefillChunk]
    q_first: bool
    cached_blocks: bytes
    cached_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, tag: _Optional[int] = ..., num_decode: _Optional[int] = ..., slot_mapping: _Optional[bytes] = ..., decode_table: _Optional[bytes] = ..., table_width: _Optional[int] = ..., decode_lens: _Optional[bytes] = ..., prefills: _Optional[_Iterable[_Union[PrefillChunk, _Mapping]]] = ..., q_first: _Optional[bool] = ..., cached_blocks: _Optional[bytes] = ..., cached_hashes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class OffloadLayer(_message.Message):
    __slots__ = ("tag", "layer", "part", "q", "k", "v", "ipc")
    class Part(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ALL: _ClassVar[OffloadLayer.Part]
        Q: _ClassVar[OffloadLayer.Part]
        KV: _ClassVar[OffloadLayer.Part]
    ALL: OffloadLayer.Part
    Q: OffloadLayer.Part
    KV: OffloadLayer.Part
    TAG_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    V_FIELD_NUMBER: _ClassVar[int]
    IPC_FIELD_NUMBER: _ClassVar[int]
    tag: int
    layer: int
    part: OffloadLayer.Part
    q: _attention_pb2.Tensor
    k: _attention_pb2.Tensor
    v: _attention_pb2.Tensor
    ipc: bool
    def __init__(self, tag: _Optional[int] = ..., layer: _Optional[int] = ..., part: _Optional[_Union[OffloadLayer.Part, str]] = ..., q: _Optional[_Union[_attention_pb2.Tensor, _Mapping]] = ..., k: _Optional[_Union[_attention_pb2.Tensor, _Mapping]] = ..., v: _Optional[_Union[_attention_pb2.Tensor, _Mapping]] = ..., ipc: _Optional[bool] = ...) -> None: ...

class LoadBlocks(_message.Message):
    __slots__ = ("block_ids", "kv")
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    block_ids: bytes
    kv: _attention_pb2.Tensor
    def __init__(self, block_ids: _Optional[bytes] = ..., kv: _Optional[_Union[_attention_pb2.Tensor, _Mapping]] = ...) -> None: ...

class OffloadRequest(_message.Message):
    __slots__ = ("id", "attach", "step", "layer", "load")
    ID_FIELD_NUMBER: _ClassVar[int]
    ATTACH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    id: int
    attach: Attach
    step: StepLayout
    layer: OffloadLayer
    load: LoadBlocks
    def __init__(self, id: _Optional[int] = ..., attach: _Optional[_Union[Attach, _Mapping]] = ..., step: _Optional[_Union[StepLayout, _Mapping]] = ..., layer: _Optional[_Union[OffloadLayer, _Mapping]] = ..., load: _Optional[_Union[LoadBlocks, _Mapping]] = ...) -> None: ...

class OffloadResponse(_message.Message):
    __slots__ = ("id", "code", "message", "out", "ipc", "ipc_links", "local_socket", "adopted_from", "cached_blocks", "cached_hashes")
    ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OUT_FIELD_NUMBER: _ClassVar[int]
    IPC_FIELD_NUMBER: _ClassVar[int]
    IPC_LINKS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_SOCKET_FIELD_NUMBER: _ClassVar[int]
    ADOPTED_FROM_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CACHED_HASHES_FIELD_NUMBER: _ClassVar[int]
    id: int
    code: int
    message: str
    out: _attention_pb2.Tensor
    ipc: bool
    ipc_links: _containers.RepeatedCompositeFieldContainer[_attention_pb2.IpcLink]
    local_socket: str
    adopted_from: str
    cached_blocks: bytes
    cached_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, id: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., out: _Optional[_Union[_attention_pb2.Tensor, _Mapping]] = ..., ipc: _Optional[bool] = ..., ipc_links: _Optional[_Iterable[_Union[_attention_pb2.IpcLink, _Mapping]]] = ..., local_socket: _Optional[str] = ..., adopted_from: _Optional[str] = ..., cached_blocks: _Optional[bytes] = ..., cached_hashes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class OffloadStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OffloadStats(_message.Message):
    __slots__ = ("worker_id", "budget_bytes", "used_bytes", "model_workers", "layer_batches", "layer_seconds")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_WORKERS_FIELD_NUMBER: _ClassVar[int]
    LAYER_BATCHES_FIELD_NUMBER: _ClassVar[int]
    LAYER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    budget_bytes: int
    used_bytes: int
    model_workers: int
    layer_batches: int
    layer_seconds: float
    def __init__(self, worker_id: _Optional[str] = ..., budget_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., model_workers: _Optional[int] = ..., layer_batches: _Optional[int] = ..., layer_seconds: _Optional[float] = ...) -> None: ...
