from protos.splitserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_MEMORY: _ClassVar[Tier]
    TIER_DISK: _ClassVar[Tier]

class Transport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSPORT_STREAM: _ClassVar[Transport]
    TRANSPORT_SHARED_MEMORY: _ClassVar[Transport]
TIER_UNSPECIFIED: Tier
TIER_MEMORY: Tier
TIER_DISK: Tier
TRANSPORT_STREAM: Transport
TRANSPORT_SHARED_MEMORY: Transport

class BlockHeader(_message.Message):
    __slots__ = ("block_id", "model_id", "token_ids", "tensors", "size", "crc32c", "owner")
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    block_id: bytes
    model_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    tensors: _containers.RepeatedCompositeFieldContainer[_common_pb2.TensorLayout]
    size: int
    crc32c: int
    owner: str
    def __init__(self, block_id: _Optional[bytes] = ..., model_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., tensors: _Optional[_Iterable[_Union[_common_pb2.TensorLayout, _Mapping]]] = ..., size: _Optional[int] = ..., crc32c: _Optional[int] = ..., owner: _Optional[str] = ...) -> None: ...

class SharedMemoryRef(_message.Message):
    __slots__ = ("path", "offset", "length")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    path: str
    offset: int
    length: int
    def __init__(self, path: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class BlockChunk(_message.Message):
    __slots__ = ("header", "data", "last", "shm")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    header: BlockHeader
    data: bytes
    last: bool
    shm: SharedMemoryRef
    def __init__(self, header: _Optional[_Union[BlockHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ..., shm: _Optional[_Union[SharedMemoryRef, _Mapping]] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("chunk", "reservation_id", "batch")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    chunk: BlockChunk
    reservation_id: str
    batch: _containers.RepeatedCompositeFieldContainer[BlockChunk]
    def __init__(self, chunk: _Optional[_Union[BlockChunk, _Mapping]] = ..., reservation_id: _Optional[str] = ..., batch: _Optional[_Iterable[_Union[BlockChunk, _Mapping]]] = ...) -> None: ...

class BlockStatus(_message.Message):
    __slots__ = ("block_id", "code", "message", "tier")
    class Code(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OK: _ClassVar[BlockStatus.Code]
        ALREADY_PRESENT: _ClassVar[BlockStatus.Code]
        NO_SPACE: _ClassVar[BlockStatus.Code]
    OK: BlockStatus.Code
    ALREADY_PRESENT: BlockStatus.Code
    NO_SPACE: BlockStatus.Code
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    block_id: bytes
    code: BlockStatus.Code
    message: str
    tier: Tier
    def __init__(self, block_id: _Optional[bytes] = ..., code: _Optional[_Union[BlockStatus.Code, str]] = ..., message: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("statuses",)
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedCompositeFieldContainer[BlockStatus]
    def __init__(self, statuses: _Optional[_Iterable[_Union[BlockStatus, _Mapping]]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("block_ids", "transport", "allow_missing", "lease_ms", "pin_id")
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    ALLOW_MISSING_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    block_ids: _containers.RepeatedScalarFieldContainer[bytes]
    transport: Transport
    allow_missing: bool
    lease_ms: int
    pin_id: str
    def __init__(self, block_ids: _Optional[_Iterable[bytes]] = ..., transport: _Optional[_Union[Transport, str]] = ..., allow_missing: _Optional[bool] = ..., lease_ms: _Optional[int] = ..., pin_id: _Optional[str] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("chunk", "missing_block_id", "batch")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    MISSING_BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    chunk: BlockChunk
    missing_block_id: bytes
    batch: _containers.RepeatedCompositeFieldContainer[BlockChunk]
    def __init__(self, chunk: _Optional[_Union[BlockChunk, _Mapping]] = ..., missing_block_id: _Optional[bytes] = ..., batch: _Optional[_Iterable[_Union[BlockChunk, _Mapping]]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("block_ids",)
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    block_ids: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, block_ids: _Optional[_Iterable[bytes]] = ...) -> None: ...

class BlockLocation(_message.Message):
    __slots__ = ("block_id", "tier", "size")
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    block_id: bytes
    tier: Tier
    size: int
    def __init__(self, block_id: _Optional[bytes] = ..., tier: _Optional[_Union[Tier, str]] = ..., size: _Optional[int] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: _containers.RepeatedCompositeFieldContainer[BlockLocation]
    def __init__(self, found: _Optional[_Iterable[_Union[BlockLocation, _Mapping]]] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("block_ids", "lease_ms", "pin_id")
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    block_ids: _containers.RepeatedScalarFieldContainer[bytes]
    lease_ms: int
    pin_id: str
    def __init__(self, block_ids: _Optional[_Iterable[bytes]] = ..., lease_ms: _Optional[int] = ..., pin_id: _Optional[str] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("pin_id", "pinned", "missing")
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    pin_id: str
    pinned: _containers.RepeatedScalarFieldContainer[bytes]
    missing: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, pin_id: _Optional[str] = ..., pinned: _Optional[_Iterable[bytes]] = ..., missing: _Optional[_Iterable[bytes]] = ...) -> None: ...

class UnpinRequest(_message.Message):
    __slots__ = ("pin_id",)
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    pin_id: str
    def __init__(self, pin_id: _Optional[str] = ...) -> None: ...

class UnpinResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("holder_id", "memory_capacity", "memory_used", "disk_capacity", "disk_used", "memory_blocks", "disk_blocks", "lent_bytes", "lend_capacity", "pinned_blocks", "demotions", "evictions", "gets", "puts", "shm_dir", "host_id")
    HOLDER_ID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_FIELD_NUMBER: _ClassVar[int]
    DISK_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    DISK_USED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DISK_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEND_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    PINNED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DEMOTIONS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    GETS_FIELD_NUMBER: _ClassVar[int]
    PUTS_FIELD_NUMBER: _ClassVar[int]
    SHM_DIR_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    holder_id: str
    memory_capacity: int
    memory_used: int
    disk_capacity: int
    disk_used: int
    memory_blocks: int
    disk_blocks: int
    lent_bytes: int
    lend_capacity: int
    pinned_blocks: int
    demotions: int
    evictions: int
    gets: int
    puts: int
    shm_dir: str
    host_id: str
    def __init__(self, holder_id: _Optional[str] = ..., memory_capacity: _Optional[int] = ..., memory_used: _Optional[int] = ..., disk_capacity: _Optional[int] = ..., disk_used: _Optional[int] = ..., memory_blocks: _Optional[int] = ..., disk_blocks: _Optional[int] = ..., lent_bytes: _Optional[int] = ..., lend_capacity: _Optional[int] = ..., pinned_blocks: _Optional[int] = ..., demotions: _Optional[int] = ..., evictions: _Optional[int] = ..., gets: _Optional[int] = ..., puts: _Optional[int] = ..., shm_dir: _Optional[str] = ..., host_id: _Optional[str] = ...) -> None: ...

class GetDeviceRequest(_message.Message):
    __slots__ = ("block_ids", "pin_id", "lease_ms")
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    block_ids: _containers.RepeatedScalarFieldContainer[bytes]
    pin_id: str
    lease_ms: int
    def __init__(self, block_ids: _Optional[_Iterable[bytes]] = ..., pin_id: _Optional[str] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class CudaIpcHandle(_message.Message):
    __slots__ = ("pool_id", "device_uuid", "handle", "storage_size", "storage_offset", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required", "pool_bytes")
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    POOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    device_uuid: str
    handle: bytes
    storage_size: int
    storage_offset: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    pool_bytes: int
    def __init__(self, pool_id: _Optional[str] = ..., device_uuid: _Optional[str] = ..., handle: _Optional[bytes] = ..., storage_size: _Optional[int] = ..., storage_offset: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: _Optional[bool] = ..., pool_bytes: _Optional[int] = ...) -> None: ...

class DeviceExtent(_message.Message):
    __slots__ = ("header", "offset")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    header: BlockHeader
    offset: int
    def __init__(self, header: _Optional[_Union[BlockHeader, _Mapping]] = ..., offset: _Optional[int] = ...) -> None: ...

class GetDeviceResponse(_message.Message):
    __slots__ = ("handle", "extents", "absent")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    EXTENTS_FIELD_NUMBER: _ClassVar[int]
    ABSENT_FIELD_NUMBER: _ClassVar[int]
    handle: CudaIpcHandle
    extents: _containers.RepeatedCompositeFieldContainer[DeviceExtent]
    absent: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, handle: _Optional[_Union[CudaIpcHandle, _Mapping]] = ..., extents: _Optional[_Iterable[_Union[DeviceExtent, _Mapping]]] = ..., absent: _Optional[_Iterable[bytes]] = ...) -> None: ...
