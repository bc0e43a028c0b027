"""Binary, versioned wire format for :class:`dasgd.core.message.Message`.

Bytes that arrive from the network are untrusted. :func:`decode` never unpickles anything, never trusts a
length it has not checked against the bytes actually present, and turns every malformed, corrupt or
unauthenticated input into a :class:`WireError` whose ``reason`` is one of :data:`REJECT_REASONS`, so the
caller can count rejections by cause and drop the message. It never raises anything else for any byte input.

Layout (version 1, every integer little-endian, no padding)::

    offset  size  field
         0     4  magic         b"DSGD"
         4     1  version       u8, = WIRE_VERSION (1)
         5     1  kind          u8, a dasgd.core.message.Kind value
         6     1  dtype         u8, payload element type (table below)
         7     1  flags         u8, bit 0: a 32-byte HMAC-SHA256 tag ends the message;
                                bit 1: detached payload (see below); other bits must be 0
         8     4  sender        u32, the worker that put the message on the link
        12     4  origin        u32, the worker that computed the gradients / issued the signal
        16     8  lo            u64, first gradient id held (inclusive)
        24     8  hi            u64, last gradient id held (exclusive); FINAL: the origin's total count;
                                MODEL: lo <= hi, a tag of the algorithm (round, request or reply)
        32     4  n_clock       u32, number of vector clock entries: 0 (no clock) or world_size
        36     8  numel         u64, number of payload elements (inline, or on the data plane if detached)
        44     8  total_length  u64, length of the whole message in bytes, tag included (a detached
                                payload's bytes are not part of the message and not counted)
        52     4  crc32         u32, zlib.crc32 of every byte except the tag, this field taken as zero
        56        (HEADER_SIZE)
        56  8*n_clock           the sender's vector clock, int64 each
         .  numel*itemsize      the payload: raw tensor bytes in C order; absent if flags bit 1
         .  32 if flags bit 0   HMAC-SHA256(key, every byte before the tag)

Payload dtype codes: 0 = no payload, 1 = float32, 2 = float64, 3 = float16, 4 = bfloat16, 5 = uint8
(:data:`DTYPE_CODES`). A present payload with zero elements is legal and distinct from "no payload".
The clock starts at offset 56 and the payload at ``56 + 8 * n_clock``: both are 8-byte aligned, so a
receive buffer can be viewed as typed arrays without realignment. Payload bytes are the host's native
order, which is little-endian on every platform PyTorch supports.

Detached payloads (flags bit 1). A transport with a separate data plane (dasgd.transport.splitplane: the
payload tensor travels by itself, e.g. over NCCL) sends only the header and clock here: dtype and numel
describe the payload that follows on the data plane, no payload bytes are in the message, total_length is
``56 + 8 * n_clock`` (+ 32 for a tag), and the crc and the HMAC cover the header and the clock only. Payload
integrity is then the data plane's business. Only GRADIENT and MODEL messages (the kinds with a payload) can
be detached. :func:`decode` refuses the flag (``bad_flags``) unless called with ``allow_detached=True``, so
a receiver that expects inline payloads never mistakes a header for a whole message; :func:`decode_detached`
accepts both forms and says which one it got. A detached header never makes decode allocate anything: numel
is only reported, and the caller checks it before posting a data-plane receive.

Decoding checks, in this order (the first failure is the reason): length >= HEADER_SIZE (``truncated``),
magic (``bad_magic``), version (``bad_version``), flags (``bad_flags``: unknown bits, or the detached bit
where it is not allowed), dtype code (``bad_dtype``), no-payload code with elements or with the detached bit
(``shape``), total_length equal to the length the header implies
(``bad_length``), total_length within the buffer (``truncated``), crc (``checksum``), authentication
(``auth``), kind (``bad_kind``), sender and origin below world_size (``unknown_sender``), id range
(``bad_range``), payload presence for the kind (``shape``), expected element count (``shape``), expected
dtype (``bad_dtype``), clock length and non-negative entries (``bad_clock``). The crc runs before the HMAC
so that accidental corruption is reported as such and costs no key work; the HMAC is what stops forgery.
"""

from __future__ import annotations

import hashlib
import hmac
import operator
import struct
import zlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

import numpy as np
import torch

from dasgd.core.message import Kind, Message

__all__ = [
    "DTYPE_CODES",
    "Decoded",
    "HEADER_SIZE",
    "REJECT_REASONS",
    "TAG_SIZE",
    "WIRE_VERSION",
    "WireError",
    "WireUsageError",
    "decode",
    "decode_detached",
    "encode",
    "encode_into",
    "encoded_size",
]

WIRE_VERSION: int = 1
"""The format version this module writes and the only one it accepts."""

MAGIC: bytes = b"DSGD"

_HEADER = struct.Struct("<4sBBBBIIQQIQQI")
HEADER_SIZE: int = _HEADER.size
"""Size in bytes of the fixed header (56)."""

TAG_SIZE: int = 32
"""Size in bytes of the HMAC-SHA256 tag."""

_FLAG_SIGNED = 0x01
_FLAG_DETACHED = 0x02
_KNOWN_FLAGS = _FLAG_SIGNED | _FLAG_DETACHED
_CRC_OFFSET = HEADER_SIZE - 4
_CLOCK_ITEMSIZE = 8
_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1
_I64_MAX = 2**63 - 1

REJECT_REASONS: tuple[str, ...] = (
    "truncated",
    "bad_magic",
    "bad_version",
    "bad_flags",
    "bad_dtype",
    "bad_length",
    "checksum",
    "auth",
    "bad_kind",
    "unknown_sender",
    "bad_range",
    "shape",
    "bad_clock",
)
"""Every value :attr:`WireError.reason` can take."""

DTYPE_CODES: Mapping[torch.dtype, int] = MappingProxyType(
    {
        torch.float32: 1,
        torch.float64: 2,
        torch.float16: 3,
        torch.bfloat16: 4,
        torch.uint8: 5,
    }
)
"""Payload torch dtype -> wire code. Code 0 means "no payload". Never renumber: part of the format."""

_CODE_DTYPES: Mapping[int, torch.dtype] = MappingProxyType({code: dt for dt, code in DTYPE_CODES.items()})
_VALID_KINDS = frozenset(int(k) for k in Kind)
_PAYLOAD_KINDS = frozenset((Kind.GRADIENT, Kind.MODEL))

# A validated message: (kind, sender, origin, lo, hi, flat payload, little-endian int64 clock). For a detached
# payload the tensor is the caller's own, unflattened: only its numel and dtype are used.
_Fields = tuple[int, int, int, int, int, torch.Tensor | None, np.ndarray | None]


class Decoded(NamedTuple):
    """What :func:`decode_detached` returns.

    Attributes:
        message: the message. For a detached payload its ``payload`` is None: the payload travels on the
            data plane and the caller puts it in (``dataclasses.replace(message, payload=tensor)``).
        detached: the header announced a detached payload (flags bit 1).
        numel: payload elements: the declared count of a detached payload, or the inline payload's count
            (0 when the message has no payload).
        dtype: payload dtype (declared or inline), or None when the message has no payload. A detached
            header always has a dtype, so ``detached`` implies ``dtype is not None``.
    """

    message: Message
    detached: bool
    numel: int
    dtype: torch.dtype | None


class WireError(ValueError):
    """Received bytes were rejected: drop the message and count it under :attr:`reason`.

    Attributes:
        reason: why, one of :data:`REJECT_REASONS`.
    """

    reason: str

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown wire reject reason {reason!r}; use one of {REJECT_REASONS}")
        super().__init__(f"rejected message ({reason}): {detail}")
        self.reason = reason


class WireUsageError(ValueError):
    """The caller passed something the codec cannot work with (a bug on this side, not bad input bytes):
    a message that breaks the format's rules, an unsupported dtype, a bad key or a too-small buffer."""


# ----------------------------------------------------------------------------------------------- sizes


def _itemsize(dtype: torch.dtype | None) -> int:
    if dtype is None:
        return 0
    if dtype not in DTYPE_CODES:
        raise WireUsageError(
            f"payload dtype {dtype} cannot be sent; use one of {sorted(str(d) for d in DTYPE_CODES)}"
        )
    return dtype.itemsize


_ITEMSIZE_BY_CODE: Mapping[int, int] = MappingProxyType(
    {0: 0, **{code: _itemsize(dt) for dt, code in DTYPE_CODES.items()}}
)


def encoded_size(
    numel: int, dtype: torch.dtype | None, n_clock: int, signed: bool, *, detached: bool = False
) -> int:
    """Length in bytes of an encoded message.

    Args:
        numel: payload element count (0 when there is no payload).
        dtype: payload dtype, or None for no payload.
        n_clock: vector clock entries (0 for no clock).
        signed: whether an HMAC tag is appended (a key is used).
        detached: the payload travels on a data plane (flags bit 1): its bytes are not counted.

    Raises:
        WireUsageError: negative counts, an unsupported dtype, or elements with ``dtype=None``.
    """
    numel = operator.index(numel)
    n_clock = operator.index(n_clock)
    if numel < 0 or n_clock < 0:
        raise WireUsageError(f"numel ({numel}) and n_clock ({n_clock}) must be >= 0")
    if dtype is None and numel != 0:
        raise WireUsageError(f"numel is {numel} but dtype is None; pass the payload dtype")
    payload_bytes = numel * _itemsize(dtype)
    if detached:
        payload_bytes = 0
    return HEADER_SIZE + _CLOCK_ITEMSIZE * n_clock + payload_bytes + (TAG_SIZE if signed else 0)


# --------------------------------------------------------------------------------------------- encode


def _check_key(key: bytes | None) -> None:
    if key is None:
        return
    if not isinstance(key, (bytes, bytearray)):
        raise WireUsageError(f"the shared secret must be bytes, got {type(key).__name__}")
    if len(key) == 0:
        # An empty secret authenticates nothing; treat it as a configuration mistake, not as "no secret".
        raise WireUsageError("the shared secret is empty; pass key=None to disable authentication")


def _uint(value: object, name: str, bound: int) -> int:
    try:
        out = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise WireUsageError(f"message {name} must be an integer, got {type(value).__name__}") from None
    if not 0 <= out <= bound:
        raise WireUsageError(f"message {name}={out} does not fit the wire field (0..{bound})")
    return out


def _checked_fields(msg: Message, detached: bool = False) -> _Fields:
    """Validate ``msg`` against the rules decode enforces, so a sender finds its bug before every
    receiver silently drops the message. Returns (kind, sender, origin, lo, hi, flat payload, clock);
    with ``detached`` the payload is returned as given (only its numel and dtype go into the header)."""
    try:
        kind = Kind(msg.kind)
    except ValueError:
        raise WireUsageError(f"message kind {msg.kind!r} is not a dasgd Kind") from None
    sender = _uint(msg.sender, "sender", _U32_MAX)
    origin = _uint(msg.origin, "origin", _U32_MAX)
    lo = _uint(msg.lo, "lo", _U64_MAX)
    hi = _uint(msg.hi, "hi", _U64_MAX)
    if kind == Kind.GRADIENT:
        if not lo < hi:
            raise WireUsageError(f"GRADIENT needs lo < hi, got [{lo}, {hi}); an empty range holds nothing")
    elif kind == Kind.FINAL:
        if lo != hi:
            raise WireUsageError(f"FINAL needs lo == hi (the total count), got lo={lo}, hi={hi}")
    elif kind == Kind.MODEL:
        if lo > hi:
            raise WireUsageError(f"MODEL needs lo <= hi (the algorithm's tag), got lo={lo}, hi={hi}")
    elif lo != 0 or hi != 0:
        raise WireUsageError(f"{kind.name} carries no id range; set lo=hi=0 (got {lo}, {hi})")

    payload = msg.payload
    if kind in _PAYLOAD_KINDS:
        if payload is None:
            raise WireUsageError(f"{kind.name} needs a payload tensor, got None")
    elif payload is not None:
        raise WireUsageError(f"{kind.name} is a control message and must have payload=None")
    if detached and payload is None:
        raise WireUsageError(
            f"{kind.name} has no payload to detach; encode it with detached=False (only GRADIENT and "
            "MODEL payloads travel on a data plane)"
        )
    if payload is not None:
        if not isinstance(payload, torch.Tensor):
            raise WireUsageError(f"payload must be a torch.Tensor, got {type(payload).__name__}")
        _itemsize(payload.dtype)  # raises for unsupported dtypes
        if not detached:
            # C-order flatten; a view whenever possible, so the one real copy is the one into the buffer.
            # Not for a detached payload: it may live on a GPU, and the header needs only numel and dtype.
            payload = payload.detach().reshape(-1)

    clock = msg.clock
    if clock is not None:
        arr = np.asarray(clock)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise WireUsageError(f"clock must be a 1-D integer array, got shape {arr.shape} {arr.dtype}")
        if arr.size > _U32_MAX:
            raise WireUsageError(f"clock has {arr.size} entries, more than the wire allows")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > _I64_MAX):
            raise WireUsageError("clock entries are gradient counts: each must be in 0..2**63-1")
        clock = arr.astype("<i8", copy=False)
    return int(kind), sender, origin, lo, hi, payload, clock


def _out_view(out: torch.Tensor) -> np.ndarray:
    if not isinstance(out, torch.Tensor):
        raise WireUsageError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != torch.uint8 or out.dim() != 1 or out.device.type != "cpu" or not out.is_contiguous():
        raise WireUsageError(
            f"out must be a contiguous 1-D uint8 CPU tensor, got {out.dtype} shape {tuple(out.shape)} "
            f"on {out.device}; allocate it with torch.empty(n, dtype=torch.uint8)"
        )
    return out.numpy()


def _size_of(fields: _Fields, key: bytes | None, detached: bool = False) -> int:
    payload, clock = fields[5], fields[6]
    numel = 0 if payload is None else payload.numel()
    dtype = None if payload is None else payload.dtype
    n_clock = 0 if clock is None else int(clock.size)
    return encoded_size(numel, dtype, n_clock, key is not None, detached=detached)


def _write(
    fields: _Fields, out: torch.Tensor, buf: np.ndarray, key: bytes | None, detached: bool = False
) -> int:
    """Write already validated ``fields`` into ``out`` (``buf`` is its numpy view, large enough)."""
    kind, sender, origin, lo, hi, payload, clock = fields
    total = _size_of(fields, key, detached)
    n_clock = 0 if clock is None else int(clock.size)
    code = 0 if payload is None else DTYPE_CODES[payload.dtype]
    numel = 0 if payload is None else payload.numel()
    flags = (_FLAG_SIGNED if key is not None else 0) | (_FLAG_DETACHED if detached else 0)
    _HEADER.pack_into(
        buf, 0, MAGIC, WIRE_VERSION, kind, code, flags, sender, origin, lo, hi, n_clock, numel, total, 0
    )
    pos = HEADER_SIZE
    if clock is not None and n_clock:
        buf[pos : pos + _CLOCK_ITEMSIZE * n_clock].view("<i8")[:] = clock
        pos += _CLOCK_ITEMSIZE * n_clock
    if payload is not None and numel and not detached:
        nbytes = numel * _ITEMSIZE_BY_CODE[code]
        dst = out[pos : pos + nbytes]
        if payload.device.type == "cpu" and payload.is_contiguous():
            # Byte-level copy: works whatever the alignment of ``out``'s storage.
            dst.copy_(payload.view(torch.uint8))
        else:
            # Strided or device tensors: let copy_ gather (and transfer) straight into ``out``, so the
            # bytes are still copied once; fall back to a staging copy if ``out`` is misaligned for dtype.
            try:
                dst.view(payload.dtype).copy_(payload)
            except RuntimeError:
                dst.copy_(payload.cpu().contiguous().view(torch.uint8))
        pos += nbytes
    body = memoryview(buf)[:pos]
    struct.pack_into("<I", buf, _CRC_OFFSET, zlib.crc32(body))
    if key is not None:
        buf[pos : pos + TAG_SIZE] = np.frombuffer(hmac.digest(key, body, hashlib.sha256), dtype=np.uint8)
        pos += TAG_SIZE
    return pos


def encode_into(msg: Message, out: torch.Tensor, key: bytes | None = None, *, detached: bool = False) -> int:
    """Encode ``msg`` into the start of ``out`` and return the encoded length.

    This is the transport's hot path: the header is packed in place, the clock is written through a
    numpy view, the payload bytes are copied exactly once, and the crc and HMAC read the written bytes in
    place. Bytes of ``out`` beyond the returned length are left untouched.

    Args:
        msg: the message; a payload of any shape is sent flattened in C order, and a non-CPU payload is
            copied to the CPU.
        out: a contiguous 1-D ``torch.uint8`` CPU tensor with at least :func:`encoded_size` elements.
        key: shared secret; when given, an HMAC-SHA256 tag is appended and flags bit 0 is set.
        detached: write only the header and clock, with flags bit 1 set: numel and dtype describe
            ``msg.payload``, which the caller sends on its data plane. The payload is not read (so it may
            stay on its device) and must exist (GRADIENT or MODEL). The crc and tag cover header and clock.

    Raises:
        WireUsageError: (a ValueError) ``out`` is too small or not a uint8 CPU vector, the key is empty,
            or ``msg`` breaks the format's rules (the same rules :func:`decode` enforces), or
            ``detached`` is set for a message without a payload.
    """
    _check_key(key)
    buf = _out_view(out)
    fields = _checked_fields(msg, detached)
    total = _size_of(fields, key, detached)
    if buf.size < total:
        raise WireUsageError(
            f"out holds {buf.size} bytes but the message needs {total}; size it with encoded_size()"
        )
    return _write(fields, out, buf, key, detached)


def encode(msg: Message, key: bytes | None = None, *, detached: bool = False) -> bytes:
    """Encode ``msg`` to a fresh ``bytes`` object (see :func:`encode_into` for the rules, ``detached`` and
    the errors)."""
    _check_key(key)
    fields = _checked_fields(msg, detached)
    scratch = bytearray(_size_of(fields, key, detached))
    out = torch.frombuffer(scratch, dtype=torch.uint8)
    n = _write(fields, out, out.numpy(), key, detached)
    if n != len(scratch):  # encoded_size and _write disagree: a bug here, never the caller's
        raise RuntimeError(f"wire encoder wrote {n} bytes, expected {len(scratch)}")
    return bytes(scratch)


# --------------------------------------------------------------------------------------------- decode


def _as_bytes_view(buf: object) -> memoryview:
    if isinstance(buf, torch.Tensor):
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.device.type != "cpu" or not buf.is_contiguous():
            raise WireUsageError(
                f"a tensor buffer must be a contiguous 1-D uint8 CPU tensor, got {buf.dtype} "
                f"shape {tuple(buf.shape)} on {buf.device}"
            )
        return memoryview(buf.numpy())
    try:
        view = memoryview(buf)  # type: ignore[arg-type]
    except TypeError:
        raise WireUsageError(
            f"decode needs bytes, bytearray, memoryview or a uint8 tensor, got {type(buf).__name__}"
        ) from None
    # A strided view (every other byte, say) cannot be read as one header: refuse it here, as a usage error,
    # rather than let struct fail on it with a BufferError.
    if not view.c_contiguous:
        raise WireUsageError("decode needs a C-contiguous byte buffer")
    if view.ndim != 1 or view.format != "B":
        try:
            view = view.cast("B")
        except TypeError:
            raise WireUsageError("decode needs a C-contiguous byte buffer") from None
    return view


def decode(
    buf: bytes | bytearray | memoryview,
    *,
    world_size: int,
    expected_numel: int | None = None,
    expected_dtype: torch.dtype | None = None,
    key: bytes | None = None,
    allow_detached: bool = False,
) -> Message:
    """Decode one message from the start of ``buf``, rejecting anything malformed.

    Args:
        buf: received bytes; may be longer than the message (the header's total_length says where it
            ends). A contiguous 1-D uint8 CPU tensor is accepted too.
        world_size: number of workers; sender and origin must be below it, and a clock must have exactly
            this many entries.
        expected_numel: when given, a payload must have exactly this many elements (control messages,
            which have no payload, are unaffected).
        expected_dtype: when given, a payload must have this dtype (control messages are unaffected).
        key: shared secret; when given, the message must carry a valid HMAC tag. Without a key a tag, if
            present, is ignored.
        allow_detached: accept a header whose payload is detached (flags bit 1); its message comes back
            with ``payload=None``, and ``expected_numel``/``expected_dtype`` apply to the declared
            payload. Use :func:`decode_detached` to learn the declared numel and dtype. When False (the
            default) such a header is rejected with ``bad_flags``.

    Returns:
        The message. Its payload is a fresh 1-D CPU tensor that owns its memory (never a view of
        ``buf``); its clock is a fresh int64 numpy array, or None when the sender sent none.

    Raises:
        WireError: the bytes are rejected; ``reason`` says why (see the module docstring for the order).
        WireUsageError: the arguments themselves are wrong (not a byte buffer, empty key, bad world_size).
    """
    return _decode(buf, world_size, expected_numel, expected_dtype, key, allow_detached).message


def decode_detached(
    buf: bytes | bytearray | memoryview,
    *,
    world_size: int,
    expected_numel: int | None = None,
    expected_dtype: torch.dtype | None = None,
    key: bytes | None = None,
) -> Decoded:
    """Decode one message that may announce a detached payload (flags bit 1), and say which it is.

    Same checks, arguments and errors as :func:`decode` with ``allow_detached=True``; a message with an
    inline payload (or none) is accepted too. For a detached header nothing is allocated from the
    declared numel: the caller checks :attr:`Decoded.numel` and :attr:`Decoded.dtype` (or passes
    ``expected_numel``/``expected_dtype``) before posting a data-plane receive of that size.

    Returns:
        A :class:`Decoded`: the message (``payload=None`` when detached), whether the payload is
        detached, and the payload's element count and dtype.
    """
    return _decode(buf, world_size, expected_numel, expected_dtype, key, True)


def _decode(
    buf: bytes | bytearray | memoryview,
    world_size: int,
    expected_numel: int | None,
    expected_dtype: torch.dtype | None,
    key: bytes | None,
    allow_detached: bool,
) -> Decoded:
    _check_key(key)
    world_size = operator.index(world_size)
    if world_size < 1:
        raise WireUsageError(f"world_size must be >= 1, got {world_size}")
    if expected_dtype is not None and expected_dtype not in DTYPE_CODES:
        raise WireUsageError(f"expected_dtype {expected_dtype} is not a wire dtype")
    view = _as_bytes_view(buf)
    avail = view.nbytes

    if avail < HEADER_SIZE:
        raise WireError("truncated", f"{avail} bytes, fewer than the {HEADER_SIZE}-byte header")
    (magic, version, kind, code, flags, sender, origin, lo, hi, n_clock, numel, total, crc) = (
        _HEADER.unpack_from(view, 0)
    )
    if magic != MAGIC:
        raise WireError("bad_magic", f"starts with {bytes(magic)!r}, not {MAGIC!r}: not a dasgd message")
    if version != WIRE_VERSION:
        raise WireError(
            "bad_version",
            f"wire version {version}, this build speaks {WIRE_VERSION}; run the same dasgd everywhere",
        )
    if flags & ~_KNOWN_FLAGS:
        raise WireError("bad_flags", f"unknown flag bits {flags:#04x}")
    detached = bool(flags & _FLAG_DETACHED)
    if detached and not allow_detached:
        raise WireError(
            "bad_flags",
            "detached payload (flags bit 1) but whole messages are expected here; decode split-plane "
            "headers with allow_detached=True or decode_detached()",
        )
    itemsize = _ITEMSIZE_BY_CODE.get(code)
    if itemsize is None:
        raise WireError("bad_dtype", f"unknown payload dtype code {code}")
    if code == 0 and numel != 0:
        raise WireError("shape", f"no-payload dtype code with numel={numel}")
    if code == 0 and detached:
        raise WireError("shape", "detached payload announced with the no-payload dtype code")
    signed = bool(flags & _FLAG_SIGNED)
    # A detached payload's bytes are elsewhere: the message ends after the clock (and tag).
    body_len = HEADER_SIZE + _CLOCK_ITEMSIZE * n_clock + (0 if detached else numel * itemsize)
    implied = body_len + (TAG_SIZE if signed else 0)
    # Checked before the buffer length so that a corrupt size field is named as such; both checks come
    # before any allocation, so no header value can make decode allocate more than the bytes received.
    if total != implied:
        raise WireError("bad_length", f"total_length {total} but the header implies {implied} bytes")
    if total > avail:
        raise WireError("truncated", f"message is {total} bytes but only {avail} arrived")

    computed = zlib.crc32(view[:_CRC_OFFSET])
    computed = zlib.crc32(b"\0\0\0\0", computed)
    computed = zlib.crc32(view[HEADER_SIZE:body_len], computed)
    if computed != crc:
        raise WireError("checksum", "crc32 mismatch: the message was corrupted in transit")

    if key is not None:
        if not signed:
            raise WireError("auth", "unsigned message but a shared secret is set; give every worker the key")
        expected_tag = hmac.digest(key, view[:body_len], hashlib.sha256)
        if not hmac.compare_digest(expected_tag, view[body_len:total]):
            raise WireError("auth", "HMAC tag does not match: forged, or the workers' secrets differ")

    if kind not in _VALID_KINDS:
        raise WireError("bad_kind", f"unknown message kind {kind}")
    kind_e = Kind(kind)
    if sender >= world_size or origin >= world_size:
        raise WireError(
            "unknown_sender", f"sender {sender} / origin {origin} outside a world of {world_size} workers"
        )
    if kind_e == Kind.GRADIENT:
        range_ok = lo < hi
    elif kind_e == Kind.FINAL:
        range_ok = lo == hi
    elif kind_e == Kind.MODEL:
        range_ok = lo <= hi
    else:
        range_ok = lo == 0 and hi == 0
    if not range_ok:
        raise WireError("bad_range", f"id range [{lo}, {hi}) is invalid for {kind_e.name}")
    has_payload = code != 0
    if has_payload != (kind_e in _PAYLOAD_KINDS):
        need = "needs a payload" if kind_e in _PAYLOAD_KINDS else "must not carry a payload"
        raise WireError("shape", f"{kind_e.name} {need}")
    dtype = _CODE_DTYPES.get(code)
    if has_payload and expected_numel is not None and numel != expected_numel:
        raise WireError("shape", f"payload has {numel} elements, expected {expected_numel}")
    if has_payload and expected_dtype is not None and dtype != expected_dtype:
        raise WireError("bad_dtype", f"payload dtype {dtype}, expected {expected_dtype}")
    if n_clock not in (0, world_size):
        raise WireError("bad_clock", f"clock has {n_clock} entries; expected 0 or world_size={world_size}")

    clock = None
    if n_clock:
        clock = np.frombuffer(view, dtype="<i8", count=n_clock, offset=HEADER_SIZE).astype(np.int64)
        if (clock < 0).any():
            raise WireError("bad_clock", "negative vector clock entry")

    payload = None
    if dtype is not None and not detached:
        payload = torch.empty(numel, dtype=dtype)
        if numel:
            start = HEADER_SIZE + _CLOCK_ITEMSIZE * n_clock
            src = np.frombuffer(view, dtype=np.uint8, count=numel * itemsize, offset=start)
            np.copyto(payload.view(torch.uint8).numpy(), src)
    return Decoded(Message(kind_e, sender, origin, lo, hi, payload, clock), detached, numel, dtype)
