from protos.splitserve.v1 import common_pb2 as _common_pb2
from protos.splitserve.v1 import kvstore_pb2 as _kvstore_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Hello(_message.Message):
    __slots__ = ("borrower_id", "layout", "ipc", "local", "host_wait", "in_place")
    BORROWER_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    IPC_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    HOST_WAIT_FIELD_NUMBER: _ClassVar[int]
    IN_PLACE_FIELD_NUMBER: _ClassVar[int]
    borrower_id: str
    layout: str
    ipc: IpcLink
    local: bool
    host_wait: bool
    in_place: bool
    def __init__(self, borrower_id: _Optional[str] = ..., layout: _Optional[str] = ..., ipc: _Optional[_Union[IpcLink, _Mapping]] = ..., local: _Optional[bool] = ..., host_wait: _Optional[bool] = ..., in_place: _Optional[bool] = ...) -> None: ...

class IpcLink(_message.Message):
    __slots__ = ("buffer", "event", "rows", "shm_path")
    BUFFER_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SHM_PATH_FIELD_NUMBER: _ClassVar[int]
    buffer: _kvstore_pb2.CudaIpcHandle
    event: bytes
    rows: int
    shm_path: str
    def __init__(self, buffer: _Optional[_Union[_kvstore_pb2.CudaIpcHandle, _Mapping]] = ..., event: _Optional[bytes] = ..., rows: _Optional[int] = ..., shm_path: _Optional[str] = ...) -> None: ...

class Borrow(_message.Message):
    __slots__ = ("seq_id", "first_block", "num_blocks")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    first_block: int
    num_blocks: int
    def __init__(self, seq_id: _Optional[str] = ..., first_block: _Optional[int] = ..., num_blocks: _Optional[int] = ...) -> None: ...

class Release(_message.Message):
    __slots__ = ("seq_ids",)
    SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    seq_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, seq_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class SeqSlice(_message.Message):
    __slots__ = ("seq_id", "q_start", "num_q", "write_start", "num_write")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    Q_START_FIELD_NUMBER: _ClassVar[int]
    NUM_Q_FIELD_NUMBER: _ClassVar[int]
    WRITE_START_FIELD_NUMBER: _ClassVar[int]
    NUM_WRITE_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    q_start: int
    num_q: int
    write_start: int
    num_write: int
    def __init__(self, seq_id: _Optional[str] = ..., q_start: _Optional[int] = ..., num_q: _Optional[int] = ..., write_start: _Optional[int] = ..., num_write: _Optional[int] = ...) -> None: ...

class StepBegin(_message.Message):
    __slots__ = ("seqs",)
    SEQS_FIELD_NUMBER: _ClassVar[int]
    seqs: _containers.RepeatedCompositeFieldContainer[SeqSlice]
    def __init__(self, seqs: _Optional[_Iterable[_Union[SeqSlice, _Mapping]]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("layout", "data")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    layout: _common_pb2.TensorLayout
    data: bytes
    def __init__(self, layout: _Optional[_Union[_common_pb2.TensorLayout, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class LayerBatch(_message.Message):
    __slots__ = ("layer", "q", "k", "v", "ipc")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    V_FIELD_NUMBER: _ClassVar[int]
    IPC_FIELD_NUMBER: _ClassVar[int]
    layer: int
    q: Tensor
    k: Tensor
    v: Tensor
    ipc: bool
    def __init__(self, layer: _Optional[int] = ..., q: _Optional[_Union[Tensor, _Mapping]] = ..., k: _Optional[_Union[Tensor, _Mapping]] = ..., v: _Optional[_Union[Tensor, _Mapping]] = ..., ipc: _Optional[bool] = ...) -> None: ...

class AttentionRequest(_message.Message):
    __slots__ = ("id", "hello", "borrow", "release", "step", "layer")
    ID_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    BORROW_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    id: int
    hello: Hello
    borrow: Borrow
    release: Release
    step: StepBegin
    layer: LayerBatch
    def __init__(self, id: _Optional[int] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., borrow: _Optional[_Union[Borrow, _Mapping]] = ..., release: _Optional[_Union[Release, _Mapping]] = ..., step: _Optional[_Union[StepBegin, _Mapping]] = ..., layer: _Optional[_Union[LayerBatch, _Mapping]] = ...) -> None: ...

class LayerResult(_message.Message):
    __slots__ = ("out", "lse", "ipc")
    OUT_FIELD_NUMBER: _ClassVar[int]
    LSE_FIELD_NUMBER: _ClassVar[int]
    IPC_FIELD_NUMBER: _ClassVar[int]
    out: Tensor
    lse: Tensor
    ipc: bool
    def __init__(self, out: _Optional[_Union[Tensor, _Mapping]] = ..., lse: _Optional[_Union[Tensor, _Mapping]] = ..., ipc: _Optional[bool] = ...) -> None: ...

class AttentionResponse(_message.Message):
    __slots__ = ("id", "code", "message", "layer", "granted", "reclaim", "ipc", "local_socket", "kv_pool", "blocks")
    ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    RECLAIM_FIELD_NUMBER: _ClassVar[int]
    IPC_FIELD_NUMBER: _ClassVar[int]
    LOCAL_SOCKET_FIELD_NUMBER: _ClassVar[int]
    KV_POOL_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    id: int
    code: int
    message: str
    layer: LayerResult
    granted: int
    reclaim: _containers.RepeatedScalarFieldContainer[str]
    ipc: IpcLink
    local_socket: str
    kv_pool: _kvstore_pb2.CudaIpcHandle
    blocks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, id: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., layer: _Optional[_Union[LayerResult, _Mapping]] = ..., granted: _Optional[int] = ..., reclaim: _Optional[_Iterable[str]] = ..., ipc: _Optional[_Union[IpcLink, _Mapping]] = ..., local_socket: _Optional[str] = ..., kv_pool: _Optional[_Union[_kvstore_pb2.CudaIpcHandle, _Mapping]] = ..., blocks: _Optional[_Iterable[int]] = ...) -> None: ...

class AttentionStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AttentionStats(_message.Message):
    __slots__ = ("holder_id", "num_blocks", "lend_cap", "lent", "lent_to", "layer_batches", "layer_seconds")
    class LentToEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    HOLDER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LEND_CAP_FIELD_NUMBER: _ClassVar[int]
    LENT_FIELD_NUMBER: _ClassVar[int]
    LENT_TO_FIELD_NUMBER: _ClassVar[int]
    LAYER_BATCHES_FIELD_NUMBER: _ClassVar[int]
    LAYER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    holder_id: str
    num_blocks: int
    lend_cap: int
    lent: int
    lent_to: _containers.ScalarMap[str, int]
    layer_batches: int
    layer_seconds: float
    def __init__(self, holder_id: _Optional[str] = ..., num_blocks: _Optional[int] = ..., lend_cap: _Optional[int] = ..., lent: _Optional[int] = ..., lent_to: _Optional[_Mapping[str, int]] = ..., layer_batches: _Optional[int] = ..., layer_seconds: _Optional[float] = ...) -> None: ...

class ReclaimRequest(_message.Message):
    __slots__ = ("keep_lent",)
    KEEP_LENT_FIELD_NUMBER: _ClassVar[int]
    keep_lent: int
    def __init__(self, keep_lent: _Optional[int] = ...) -> None: ...

class ReclaimResponse(_message.Message):
    __slots__ = ("asked",)
    ASKED_FIELD_NUMBER: _ClassVar[int]
    asked: int
    def __init__(self, asked: _Optional[int] = ...) -> None: ...
