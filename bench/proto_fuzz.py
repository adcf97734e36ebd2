"""Hypothesis strategies for protobuf messages at the wire level, from their descriptors.

A message is drawn as a list of wire fields and encoded by hand, so that besides well-formed
messages with extreme values (the whole range of each integer type, NaN and infinities, empty
and long strings and lists) it can be what no protobuf library would write: strings that are
not UTF-8, unknown field numbers, a known field with the wrong wire type, over-long varints,
negative numbers in unsigned fields, and bytes cut off mid-field.

    st_message(generate_pb2.GenerateRequest.DESCRIPTOR, overrides={"model": st.just(b"tiny")})
"""

from __future__ import annotations

import struct

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from kvstore import wire

VARINT, I64, LEN, I32 = 0, 1, 2, 5
_U = {32: 2**32 - 1, 64: 2**64 - 1}

# Text with the awkward parts of Unicode (controls, surrogates' neighbours, astral planes).
TEXT = st.text(st.characters(codec="utf-8"), max_size=64)
INVALID_UTF8 = st.sampled_from(
    [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"a\x80b", b"\xe2\x82"]
)


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, each drawn with its weight (st.one_of picks evenly among distinct
    branches)."""
    table = [strat for w, strat in choices for _ in range(w)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


def varint(n: int) -> bytes:
    """Two's complement in 64 bits for negatives, as protobuf writes int32/int64."""
    return wire.varint(n & _U[64])


def key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def field_bytes(number: int, wire_type: int, payload: bytes) -> bytes:
    if wire_type == LEN:
        return key(number, LEN) + varint(len(payload)) + payload
    return key(number, wire_type) + payload


def _ints(bits: int, signed: bool) -> st.SearchStrategy[int]:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, _U[bits])
    edges = [lo, hi, 0, 1, -1, hi // 2 + 1, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, -(2**63)]
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi), st.integers(0, 300))


_EDGE_FLOATS = [0.0, -0.0, 1.0, -1.0, 2.0, 100.0, 101.0, 3.4e38, -3.4e38, 1e-45]
_FLOATS = st.one_of(
    st.sampled_from([*_EDGE_FLOATS, float("nan"), float("inf"), float("-inf")]),
    st.floats(width=32, allow_nan=True, allow_infinity=True),
)


def _scalar(f: FieldDescriptor, corrupt: bool) -> st.SearchStrategy[tuple[int, bytes]]:
    """(wire type, payload) of one value of a scalar field: a small plausible one or an extreme
    one (Hypothesis favours a one_of's first branches: plausible ones come first, so that whole
    messages are often valid and go deep). corrupt: strings may be invalid UTF-8."""
    t = f.type
    if t in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
        text = TEXT.map(str.encode)
        long = st.integers(1000, 100_000).map(lambda n: b"x" * n)
        strings = st.one_of(text, long, INVALID_UTF8) if corrupt else st.one_of(text, long)
        return strings.map(lambda b: (LEN, b))
    if t == FieldDescriptor.TYPE_BOOL:
        return st.sampled_from([0, 1, 2, 2**63]).map(lambda n: (VARINT, varint(n)))
    if t == FieldDescriptor.TYPE_FLOAT:
        plausible = st.floats(0, 1, width=32)
        return weighted((3, plausible), (1, _FLOATS)).map(lambda x: (I32, struct.pack("<f", x)))
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.floats().map(lambda x: (I64, struct.pack("<d", x)))
    bits = 64 if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64) else 32
    signed = t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64)
    # A negative number in an unsigned field is on the wire too (10-byte varint).
    extreme = st.one_of(_ints(bits, signed), st.sampled_from([-1, -(2**31), -(2**63)]))
    values = weighted((3, st.integers(0, 24)), (1, extreme))
    return values.map(lambda n: (VARINT, varint(n)))


def _repeated(
    f: FieldDescriptor, value: st.SearchStrategy[tuple[int, bytes]]
) -> st.SearchStrategy[bytes]:
    n = f.number
    one = value.map(lambda wv: field_bytes(n, *wv))
    small = st.lists(one, max_size=8).map(b"".join)
    if f.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_STRING):
        return small
    # Numbers: packed too (one LEN field), long lists included.
    packed = st.lists(value.map(lambda wv: wv[1]), min_size=1, max_size=2000).map(
        lambda vs: field_bytes(n, LEN, b"".join(vs))
    )
    return st.one_of(small, packed)


def st_message(
    desc: Descriptor,
    overrides: dict[str, st.SearchStrategy[bytes]] | None = None,
    corrupt: bool = False,
    depth: int = 3,
) -> st.SearchStrategy[bytes]:
    """A message of `desc` as bytes: well-formed (any values its types allow; unknown fields
    are well-formed too), or with corrupt, one protobuf must refuse now and then (strings that
    are not UTF-8, known fields with the wrong wire type). overrides: a field name's payload
    strategy, to steer towards values a server accepts (a served model name) most of the time."""
    overrides = overrides or {}
    parts: list[st.SearchStrategy[bytes]] = []
    oneofs: dict[str, list[st.SearchStrategy[bytes]]] = {}
    for f in desc.fields:
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if depth == 0:
                continue
            sub = st_message(f.message_type, overrides, corrupt, depth - 1)
            value = sub.map(lambda b: (LEN, b))
        else:
            value = _scalar(f, corrupt)
        if f.is_repeated:
            enc = _repeated(f, value)
        else:
            enc = value.map(lambda wv, n=f.number: field_bytes(n, *wv))
        if f.name in overrides:  # mostly the steered value
            steer = overrides[f.name].map(lambda b, n=f.number: field_bytes(n, LEN, b))
            enc = weighted((8, steer), (1, enc))
        if f.containing_oneof is not None:
            oneofs.setdefault(f.containing_oneof.name, []).append(enc)
        elif f.name in overrides:
            parts.append(weighted((8, enc), (1, st.just(b""))))
        else:  # a message sets a few of its fields
            parts.append(weighted((2, st.just(b"")), (1, enc)))
    for members in oneofs.values():
        parts.append(st.one_of(*members, st.just(b"")))
    odd = st.one_of(st.just(b""), _oddity(desc, corrupt))
    return st.tuples(*parts, odd).map(b"".join)


def _oddity(desc: Descriptor, corrupt: bool) -> st.SearchStrategy[bytes]:
    """An unknown field, or (corrupt) a known one with a wire type that does not match its
    type."""
    numbers = [f.number for f in desc.fields]
    unknown = st.integers(1, 2**29 - 1).filter(lambda n: n not in numbers)
    wrong = st.sampled_from(numbers) if numbers and corrupt else unknown
    payload = st.sampled_from(
        [(VARINT, varint(7)), (I32, b"\0\0\0\0"), (I64, b"\0" * 8), (LEN, b"abc")]
    )
    return st.tuples(st.one_of(unknown, wrong), payload).map(lambda t: field_bytes(t[0], *t[1]))


def st_request(
    desc: Descriptor, overrides: dict[str, st.SearchStrategy[bytes]] | None = None
) -> st.SearchStrategy[bytes]:
    """What a hostile client sends: mostly well-formed messages, else one with corrupt parts,
    cut short (a truncated field), or followed by an over-long varint or a length running past
    the end."""
    good = st_message(desc, overrides)
    bad = st_message(desc, overrides, corrupt=True)
    cut = st.tuples(good, st.floats(0, 1)).map(lambda t: t[0][: int(len(t[0]) * t[1])])
    tails = st.sampled_from([b"\x80" * 11, b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x05ab", b"\x0f"])
    broken = st.tuples(good, tails).map(b"".join)
    return weighted((6, good), (2, bad), (1, cut), (1, broken))


# gRPC's server-side failures (its "5xx"): a hostile request must never get one.
SERVER_FAILURES = frozenset({"UNKNOWN", "INTERNAL", "DATA_LOSS", "UNAVAILABLE", "UNIMPLEMENTED"})


def fixed_budget(examples: int) -> settings:
    """The same examples every run, at most `examples`, no example database, no shrinking."""
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
