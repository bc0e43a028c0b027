"""Binary, versioned wire format for :class:`dasgd.core.message.Message`, and the link handshake.

Bytes that arrive from the network are untrusted. :func:`decode` never unpickles anything, never trusts a
length it has not checked against the bytes actually present, and turns every malformed, corrupt,
unauthenticated, replayed or misdirected input into a :class:`WireError` whose ``reason`` is one of
:data:`REJECT_REASONS`, so the caller can count rejections by cause and drop the message. It never raises
anything else for any byte input.

A message belongs to one direction of one link of one run, a :class:`Link`: the run's nonce (16 bytes agreed
at the rendezvous), the sender and the receiver. Each message on a link carries the next sequence number of
that link (the HELLO that opens the link is number 0, the first message after it number 1), and the receiver
accepts exactly the number it expects next: a link is FIFO, so anything else is a replay or a reordering.

Layout (version 2, every integer little-endian, no padding). A message is a fixed 152-byte header, then the
sender's vector clock, then the payload unless it is *detached* (sent as a transfer of its own)::

    offset  size  field
         0     4  magic         b"DSGD"
         4     1  version       u8, = WIRE_VERSION (2); later versions keep bytes 0..4 where they are
         5     1  kind          u8, a dasgd.core.message.Kind value, or 0 for the link's HELLO
         6     1  dtype         u8, payload element type (table below)
         7     1  flags         u8, bit 0: signed (a key is used); bit 1: detached payload; bit 2: the
                                digest field holds the detached payload's digest; other bits must be 0
         8     4  sender        u32, the worker that put the message on the link
        12     4  receiver      u32, the worker the link leads to
        16     4  origin        u32, the worker that computed the gradients / issued the signal
        20     4  n_clock       u32, number of vector clock entries: 0 (no clock) or world_size
        24     8  seq           u64, the message's number on its link (HELLO: 0)
        32     8  lo            u64 <= 2**63-1, first gradient id held (inclusive)
        40     8  hi            u64 <= 2**63-1, last gradient id held (exclusive); FINAL: the origin's total
                                count (lo == hi); MARKER: the checkpoint id (lo == hi); MODEL: lo <= hi, a tag of the algorithm (round, request or reply)
        48     8  numel         u64, number of payload elements (inline, or in the detached transfer)
        56     8  total_length  u64, bytes of this message: header, clock and inline payload (a detached
                                payload is not counted)
        64    16  nonce         the run's nonce
        80    32  digest        detached payload with flags bit 2: SHA-256 of its bytes when signed, else
                                its zlib.crc32 as u32 followed by 28 zero bytes; HELLO: the spec digest;
                                otherwise all zero
       112     4  crc32         zlib.crc32 of the whole message with this field and the tag taken as zero
       116     4  reserved      0
       120    32  tag           signed: HMAC-SHA256(key, the whole message with the tag taken as zero);
                                unsigned: all zero
       152        (HEADER_SIZE)
       152  8*n_clock           the sender's vector clock, int64 each
         .  numel*itemsize      the payload: raw tensor bytes in C order; absent if detached

Payload dtype codes: 0 = no payload, 1 = float32, 2 = float64, 3 = float16, 4 = bfloat16, 5 = uint8
(:data:`DTYPE_CODES`). A present payload with zero elements is legal and distinct from "no payload". The
clock starts at offset 152 and the payload at ``152 + 8 * n_clock``: both are 8-byte aligned, so a receive
buffer can be viewed as typed arrays. Payload bytes are the host's native order, which is little-endian on
every platform PyTorch supports. Ids and counts are bounded by 2**63-1 because receivers hold them in int64
vector clocks: a larger one would overflow there, so it is refused here (``bad_range``).

Why this shape: a receiver posts a fixed-size receive (the header, its clock and a small inline payload; see
the transports) and learns everything else from a header it has verified. A payload too large to ride along
is detached: the header announces its dtype and element count and binds its bytes through the digest, and
the receiver posts a receive of exactly that size only after checking the header. So no byte count chosen by
a peer reaches a posted receive (a Gloo receive that gets more bytes than it posted aborts the process), and
the signature covers the detached bytes too. Only GRADIENT and MODEL messages (the kinds with a payload) can
be detached. :func:`decode` refuses the flag (``bad_flags``) unless called with ``allow_detached=True``;
:func:`decode_detached` accepts both forms and says which one it got; :func:`verify_payload` checks a
detached payload against its header once it has arrived. Without a key the digest is a crc (accidental
corruption only); a detached payload without a digest (flags bit 2 clear) is accepted only unsigned.

HELLO (kind 0): the first message on every link, before any other. Its fields: sender, receiver, seq 0,
origin = sender, dtype and numel = the payload dtype and element count the sender's transport carries,
lo = the sender's world size, hi = 0, no clock, no payload, and the digest field = the spec digest (what
the sender's run is: task, model, workers, transport). :func:`check_hello` refuses a peer whose version, key,
run, link, world size, payload or spec digest differs from ours, and says which. A HELLO is exactly
HEADER_SIZE bytes, in this version and every later one, so that any version can refuse any other by name.

Decoding checks, in this order (the first failure is the reason): length >= HEADER_SIZE (``truncated``),
magic (``bad_magic``), version (``bad_version``), flags and reserved fields (``bad_flags``: unknown bits,
the detached bit where it is not allowed, a digest bit without a detached payload, a non-zero reserved
field, or a digest or tag field that must be zero and is not), dtype code (``bad_dtype``), no-payload code
with elements or with the detached bit (``shape``), total_length equal to the length the header implies
(``bad_length``), total_length within the buffer (``truncated``), crc (``checksum``), authentication
(``auth``: signed when we have no key, unsigned when we have one, a signed detached payload without a
digest, or a wrong tag), nonce (``wrong_run``), sender and receiver below world_size (``unknown_sender``),
sender and receiver of this link (``wrong_sender``, ``wrong_receiver``), sequence number (``replay``), kind
(``bad_kind``), origin below world_size (``unknown_sender``), id range (``bad_range``), payload presence for
the kind (``shape``), expected element count (``shape``), expected dtype (``bad_dtype``), clock length and
non-negative entries (``bad_clock``). The crc runs before the HMAC so that accidental corruption is
reported as such and costs no key work; the HMAC is what stops forgery. A detached payload that does not
match its digest is ``bad_digest``.

A :class:`WireError` raised after authentication carries the authentic :class:`Header` (``header``), and
says whether the message held the link's expected sequence number (``in_sequence``): a transport uses these
to keep its sequence and its payload transfers in step with the sender.
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
from dasgd.errors import DasgdError

__all__ = [
    "DIGEST_SIZE",
    "DTYPE_CODES",
    "Decoded",
    "HEADER_SIZE",
    "HELLO_KIND",
    "Header",
    "Link",
    "MAX_ID",
    "NONCE_SIZE",
    "REJECT_REASONS",
    "TAG_SIZE",
    "WIRE_VERSION",
    "WireError",
    "WireUsageError",
    "check_hello",
    "decode",
    "decode_detached",
    "encode",
    "encode_hello",
    "encode_into",
    "encoded_size",
    "payload_digest",
    "verify_payload",
]

WIRE_VERSION: int = 2
"""The format version this module writes and the only one it accepts."""

MAGIC: bytes = b"DSGD"

_HEADER = struct.Struct("<4sBBBBIIIIQQQQQ16s32sII32s")
HEADER_SIZE: int = _HEADER.size
"""Size in bytes of the fixed header (152); also the size of a HELLO."""

TAG_SIZE: int = 32
"""Size in bytes of the HMAC-SHA256 tag field."""

NONCE_SIZE: int = 16
"""Size in bytes of the run nonce."""

DIGEST_SIZE: int = 32
"""Size in bytes of the digest field (payload digest or spec digest)."""

HELLO_KIND: int = 0
"""The kind byte of a HELLO (not a :class:`Kind`: a HELLO never reaches a worker)."""

MAX_ID: int = 2**63 - 1
"""Largest value of ``lo``/``hi`` (and of a clock entry): receivers keep ids in int64 vector clocks."""

_FLAG_SIGNED = 0x01
_FLAG_DETACHED = 0x02
_FLAG_DIGEST = 0x04
_KNOWN_FLAGS = _FLAG_SIGNED | _FLAG_DETACHED | _FLAG_DIGEST
_DIGEST_OFFSET = 80
_CRC_OFFSET = 112
_TAG_OFFSET = 120
_CLOCK_ITEMSIZE = 8
_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1
_ZERO_TAG = bytes(TAG_SIZE)
_ZERO_DIGEST = bytes(DIGEST_SIZE)
_ZERO_CRC = bytes(4)

REJECT_REASONS: tuple[str, ...] = (
    "truncated",
    "bad_magic",
    "bad_version",
    "bad_flags",
    "bad_dtype",
    "bad_length",
    "checksum",
    "auth",
    "wrong_run",
    "wrong_sender",
    "wrong_receiver",
    "replay",
    "bad_kind",
    "unknown_sender",
    "bad_range",
    "shape",
    "bad_clock",
    "bad_digest",
    "spec_mismatch",
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
# payload the tensor is the caller's own, unflattened: only its numel and dtype go into the header.
_Fields = tuple[int, int, int, int, int, torch.Tensor | None, np.ndarray | None]


class Link(NamedTuple):
    """One direction of one link in one run: what every message on it is bound to.

    Attributes:
        nonce: the run's nonce, :data:`NONCE_SIZE` bytes agreed by every worker at the rendezvous.
        sender: the worker that sends on this link.
        receiver: the worker that receives on it.
    """

    nonce: bytes
    sender: int
    receiver: int


class Header(NamedTuple):
    """A header that passed the crc and, with a key, the HMAC (the fields as sent, checked or not).

    Attributes:
        kind: the kind byte (a :class:`Kind` value, or :data:`HELLO_KIND`).
        sender, receiver, origin: workers, as in the layout.
        seq: the message's number on its link.
        lo, hi: the id range (or tag, or count) as in the layout.
        dtype: payload dtype, or None for no payload.
        numel: payload elements (inline or detached).
        n_clock: clock entries that follow the header.
        total_length: bytes of the message (header, clock, inline payload).
        detached: the payload travels as a transfer of its own.
        nonce: the run nonce the message carries.
        digest: the digest field when it means something (a detached payload's digest, or a HELLO's spec
            digest), else None.
        signed: the message carries an HMAC tag.
    """

    kind: int
    sender: int
    receiver: int
    origin: int
    seq: int
    lo: int
    hi: int
    dtype: torch.dtype | None
    numel: int
    n_clock: int
    total_length: int
    detached: bool
    nonce: bytes
    digest: bytes | None
    signed: bool


class Decoded(NamedTuple):
    """What :func:`decode_detached` returns.

    Attributes:
        message: the message. For a detached payload its ``payload`` is None: the payload travels as a
            transfer of its own and the caller puts it in (``dataclasses.replace(message, payload=tensor)``)
            after :func:`verify_payload`.
        detached: the header announced a detached payload (flags bit 1).
        numel: payload elements: the declared count of a detached payload, or the inline payload's count
            (0 when the message has no payload).
        dtype: payload dtype (declared or inline), or None when the message has no payload. A detached
            header always has a dtype, so ``detached`` implies ``dtype is not None``.
        header: the verified header (its digest is what :func:`verify_payload` checks).
    """

    message: Message
    detached: bool
    numel: int
    dtype: torch.dtype | None
    header: Header


class WireError(DasgdError, ValueError):
    """Received bytes were rejected: drop the message and count it under :attr:`reason`.

    Attributes:
        reason: why, one of :data:`REJECT_REASONS`.
        header: the header, when the message was refused after it had been authenticated (crc, and the
            HMAC when a key is used); None when the refusal came earlier and nothing in it can be trusted.
        in_sequence: the message was authentic, on this link, and held the sequence number the receiver
            expected, so that number is used up (the receiver expects the next one from now on).
    """

    reason: str
    header: Header | None
    in_sequence: bool

    def __init__(
        self, reason: str, detail: str, header: Header | None = None, in_sequence: bool = False
    ) -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown wire reject reason {reason!r}; use one of {REJECT_REASONS}")
        super().__init__(f"rejected message ({reason}): {detail}")
        self.reason = reason
        self.header = header
        self.in_sequence = in_sequence


class WireUsageError(ValueError):
    """The caller passed something the codec cannot work with (a bug on this side, not bad input bytes):
    a message that breaks the format's rules, an unsupported dtype, a bad key, link or a too-small buffer."""


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
    numel: int, dtype: torch.dtype | None, n_clock: int, signed: bool = False, *, detached: bool = False
) -> int:
    """Length in bytes of an encoded message (header, clock and inline payload).

    Args:
        numel: payload element count (0 when there is no payload).
        dtype: payload dtype, or None for no payload.
        n_clock: vector clock entries (0 for no clock).
        signed: whether a key is used. The tag field is always there, so this does not change the size;
            it is accepted so that callers can say what they send.
        detached: the payload travels as a transfer of its own (flags bit 1): its bytes are not counted.

    Raises:
        WireUsageError: negative counts, an unsupported dtype, or elements with ``dtype=None``.
    """
    numel = operator.index(numel)
    n_clock = operator.index(n_clock)
    if numel < 0 or n_clock < 0:
        raise WireUsageError(f"numel ({numel}) and n_clock ({n_clock}) must be >= 0")
    if dtype is None and numel != 0:
        raise WireUsageError(f"numel is {numel} but dtype is None; pass the payload dtype")
    payload_bytes = 0 if detached else numel * _itemsize(dtype)
    return HEADER_SIZE + _CLOCK_ITEMSIZE * n_clock + payload_bytes


# ------------------------------------------------------------------------------------- keys and digests


def _check_key(key: bytes | None) -> None:
    if key is None:
        return
    if not isinstance(key, (bytes, bytearray)):
        raise WireUsageError(f"the shared secret must be bytes, got {type(key).__name__}")
    if len(key) == 0:
        # An empty secret authenticates nothing; treat it as a configuration mistake, not as "no secret".
        raise WireUsageError("the shared secret is empty; pass key=None to disable authentication")


def _check_link(link: object, world_size: int | None = None) -> Link:
    if not isinstance(link, tuple) or len(link) != 3:
        raise WireUsageError(f"link must be a Link(nonce, sender, receiver), got {type(link).__name__}")
    nonce, sender, receiver = link
    if not isinstance(nonce, (bytes, bytearray)) or len(nonce) != NONCE_SIZE:
        raise WireUsageError(f"the run nonce must be {NONCE_SIZE} bytes, got {nonce!r}")
    for name, value in (("sender", sender), ("receiver", receiver)):
        try:
            rank = operator.index(value)
        except TypeError:
            raise WireUsageError(f"link {name} must be an integer, got {type(value).__name__}") from None
        if not 0 <= rank <= _U32_MAX:
            raise WireUsageError(f"link {name} {rank} does not fit the wire field (0..{_U32_MAX})")
        if world_size is not None and rank >= world_size:
            raise WireUsageError(f"link {name} {rank} is not a worker of a world of {world_size}")
    return Link(bytes(nonce), int(sender), int(receiver))


def _payload_bytes(payload: torch.Tensor) -> np.ndarray:
    """The C-order bytes of ``payload`` as a uint8 numpy view (a host copy for a device tensor)."""
    flat = payload.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()  # synchronous: the caller's stream must already hold the final values
    return flat.contiguous().view(torch.uint8).numpy()


def payload_digest(payload: torch.Tensor, signed: bool) -> bytes:
    """The digest field for a detached ``payload`` (:data:`DIGEST_SIZE` bytes).

    Signed messages: SHA-256 of the payload's C-order bytes (the HMAC over the header then binds them).
    Unsigned: their crc32 as u32, then zero bytes: it catches accidental corruption only, as a crc does.
    A payload on a device is copied to the host first.
    """
    data = _payload_bytes(payload)
    if signed:
        return hashlib.sha256(data).digest()
    return struct.pack("<I", zlib.crc32(data)) + bytes(DIGEST_SIZE - 4)


# --------------------------------------------------------------------------------------------- encode


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
    lo = _uint(msg.lo, "lo", MAX_ID)
    hi = _uint(msg.hi, "hi", MAX_ID)
    if kind == Kind.GRADIENT:
        if not lo < hi:
            raise WireUsageError(f"GRADIENT needs lo < hi, got [{lo}, {hi}); an empty range holds nothing")
    elif kind in (Kind.FINAL, Kind.MARKER):
        if lo != hi:
            what = "the total count" if kind == Kind.FINAL else "the checkpoint id"
            raise WireUsageError(f"{kind.name} needs lo == hi ({what}), got lo={lo}, hi={hi}")
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
            "MODEL payloads travel on their own)"
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
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > MAX_ID):
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


def _size_of(fields: _Fields, detached: bool = False) -> int:
    payload, clock = fields[5], fields[6]
    numel = 0 if payload is None else payload.numel()
    dtype = None if payload is None else payload.dtype
    n_clock = 0 if clock is None else int(clock.size)
    return encoded_size(numel, dtype, n_clock, detached=detached)


def _seal(buf: np.ndarray, pos: int, key: bytes | None) -> None:
    """Write the crc and, with a key, the tag of the ``pos``-byte message in ``buf`` (both fields zero)."""
    body = memoryview(buf)[:pos]
    struct.pack_into("<I", buf, _CRC_OFFSET, zlib.crc32(body))
    if key is not None:
        tag = hmac.digest(key, body, hashlib.sha256)
        buf[_TAG_OFFSET : _TAG_OFFSET + TAG_SIZE] = np.frombuffer(tag, dtype=np.uint8)


def _write(
    fields: _Fields,
    out: torch.Tensor,
    buf: np.ndarray,
    key: bytes | None,
    link: Link,
    seq: int,
    detached: bool,
    digest: bool,
) -> int:
    """Write already validated ``fields`` into ``out`` (``buf`` is its numpy view, large enough)."""
    kind, sender, origin, lo, hi, payload, clock = fields
    total = _size_of(fields, detached)
    n_clock = 0 if clock is None else int(clock.size)
    code = 0 if payload is None else DTYPE_CODES[payload.dtype]
    numel = 0 if payload is None else payload.numel()
    flags = (_FLAG_SIGNED if key is not None else 0) | (_FLAG_DETACHED if detached else 0)
    digest_field = _ZERO_DIGEST
    if detached and digest:
        assert payload is not None  # _checked_fields refuses to detach nothing
        digest_field = payload_digest(payload, key is not None)
        flags |= _FLAG_DIGEST
    _HEADER.pack_into(
        buf,
        0,
        MAGIC,
        WIRE_VERSION,
        kind,
        code,
        flags,
        sender,
        link.receiver,
        origin,
        n_clock,
        seq,
        lo,
        hi,
        numel,
        total,
        link.nonce,
        digest_field,
        0,
        0,
        _ZERO_TAG,
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
    _seal(buf, pos, key)
    return pos


def _check_seq(seq: object) -> int:
    try:
        out = operator.index(seq)  # type: ignore[arg-type]
    except TypeError:
        raise WireUsageError(f"seq must be an integer, got {type(seq).__name__}") from None
    if not 0 <= out <= _U64_MAX:
        raise WireUsageError(f"seq={out} does not fit the wire field (0..{_U64_MAX})")
    return out


def encode_into(
    msg: Message,
    out: torch.Tensor,
    key: bytes | None = None,
    *,
    link: Link,
    seq: int,
    detached: bool = False,
    digest: bool = True,
) -> int:
    """Encode ``msg`` into the start of ``out`` and return the encoded length.

    This is the transport's hot path: the header is packed in place, the clock is written through a
    numpy view, the payload bytes are copied exactly once, and the crc and HMAC read the written bytes in
    place. Bytes of ``out`` beyond the returned length are left untouched.

    Args:
        msg: the message; a payload of any shape is sent flattened in C order, and a non-CPU payload is
            copied to the CPU. ``msg.sender`` must be ``link.sender``.
        out: a contiguous 1-D ``torch.uint8`` CPU tensor with at least :func:`encoded_size` elements.
        key: shared secret; when given, the tag field holds an HMAC-SHA256 and flags bit 0 is set.
        link: the link the message goes on (run nonce, sender, receiver).
        seq: the message's number on that link (1 for the first message after the HELLO).
        detached: write only the header and clock, with flags bit 1 set: numel and dtype describe
            ``msg.payload``, which the caller sends as a transfer of its own. The payload must exist
            (GRADIENT or MODEL).
        digest: with ``detached``, put the payload's digest (:func:`payload_digest`) in the header, which
            reads the payload (a device payload is copied to the host for it). Must be True with a key.

    Raises:
        WireUsageError: (a ValueError) ``out`` is too small or not a uint8 CPU vector, the key is empty,
            the link or seq is malformed or names another sender, ``msg`` breaks the format's rules (the
            same rules :func:`decode` enforces), ``detached`` is set for a message without a payload, or
            a signed detached payload would travel without its digest.
    """
    _check_key(key)
    link = _check_link(link)
    seq = _check_seq(seq)
    buf = _out_view(out)
    fields = _checked_fields(msg, detached)
    _check_sender(fields, link)
    if detached and not digest and key is not None:
        raise WireUsageError("a signed message must carry its detached payload's digest; pass digest=True")
    total = _size_of(fields, detached)
    if buf.size < total:
        raise WireUsageError(
            f"out holds {buf.size} bytes but the message needs {total}; size it with encoded_size()"
        )
    return _write(fields, out, buf, key, link, seq, detached, digest)


def _check_sender(fields: _Fields, link: Link) -> None:
    if fields[1] != link.sender:
        raise WireUsageError(
            f"message sender {fields[1]} is not the link's sender {link.sender}; a worker only sends as itself"
        )


def encode(
    msg: Message,
    key: bytes | None = None,
    *,
    link: Link,
    seq: int,
    detached: bool = False,
    digest: bool = True,
) -> bytes:
    """Encode ``msg`` to a fresh ``bytes`` object (see :func:`encode_into` for the arguments, the rules and
    the errors)."""
    _check_key(key)
    link = _check_link(link)
    seq = _check_seq(seq)
    fields = _checked_fields(msg, detached)
    _check_sender(fields, link)
    if detached and not digest and key is not None:
        raise WireUsageError("a signed message must carry its detached payload's digest; pass digest=True")
    scratch = bytearray(_size_of(fields, detached))
    out = torch.frombuffer(scratch, dtype=torch.uint8)
    n = _write(fields, out, out.numpy(), key, link, seq, detached, digest)
    if n != len(scratch):  # encoded_size and _write disagree: a bug here, never the caller's
        raise RuntimeError(f"wire encoder wrote {n} bytes, expected {len(scratch)}")
    return bytes(scratch)


def encode_hello(
    *,
    link: Link,
    key: bytes | None,
    world_size: int,
    numel: int,
    dtype: torch.dtype,
    spec_digest: bytes,
) -> bytes:
    """The HELLO that opens ``link``: :data:`HEADER_SIZE` bytes (see the module docstring for its fields).

    Args:
        link: the link (run nonce, this worker as sender, the peer as receiver).
        key: shared secret; the HELLO's tag is then the proof that this worker holds it.
        world_size: workers in the run.
        numel: payload elements this worker's transport carries.
        dtype: payload dtype this worker's transport carries.
        spec_digest: :data:`DIGEST_SIZE` bytes that identify the run's spec.

    Raises:
        WireUsageError: a malformed argument.
    """
    _check_key(key)
    link = _check_link(link)
    world_size = operator.index(world_size)
    if not 1 <= world_size <= _U32_MAX or link.sender >= world_size or link.receiver >= world_size:
        raise WireUsageError(f"link {link.sender}->{link.receiver} is not inside a world of {world_size}")
    numel = _uint(numel, "numel", _U64_MAX)
    if dtype not in DTYPE_CODES:
        raise WireUsageError(f"payload dtype {dtype} cannot be sent")
    if not isinstance(spec_digest, (bytes, bytearray)) or len(spec_digest) != DIGEST_SIZE:
        raise WireUsageError(f"spec_digest must be {DIGEST_SIZE} bytes")
    buf = np.zeros(HEADER_SIZE, dtype=np.uint8)
    _HEADER.pack_into(
        buf,
        0,
        MAGIC,
        WIRE_VERSION,
        HELLO_KIND,
        DTYPE_CODES[dtype],
        _FLAG_SIGNED if key is not None else 0,
        link.sender,
        link.receiver,
        link.sender,
        0,
        0,
        world_size,
        0,
        numel,
        HEADER_SIZE,
        link.nonce,
        bytes(spec_digest),
        0,
        0,
        _ZERO_TAG,
    )
    _seal(buf, HEADER_SIZE, key)
    return buf.tobytes()


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


def _check_world(world_size: object) -> int:
    world = operator.index(world_size)  # type: ignore[arg-type]
    if world < 1:
        raise WireUsageError(f"world_size must be >= 1, got {world}")
    return world


def _authentic(view: memoryview, key: bytes | None, allow_detached: bool, hello: bool) -> Header:
    """Run the structural, crc and authentication checks (the module docstring's order up to ``auth``) on
    the message at the start of ``view`` and return its header. ``hello``: a HELLO is expected here."""
    avail = view.nbytes
    if avail < HEADER_SIZE:
        raise WireError("truncated", f"{avail} bytes, fewer than the {HEADER_SIZE}-byte header")
    (
        magic,
        version,
        kind,
        code,
        flags,
        sender,
        receiver,
        origin,
        n_clock,
        seq,
        lo,
        hi,
        numel,
        total,
        nonce,
        digest,
        crc,
        reserved,
        tag,
    ) = _HEADER.unpack_from(view, 0)
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
    signed = bool(flags & _FLAG_SIGNED)
    has_digest = bool(flags & _FLAG_DIGEST)
    if detached and not allow_detached:
        raise WireError(
            "bad_flags",
            "detached payload (flags bit 1) but whole messages are expected here; decode headers of "
            "detached payloads with allow_detached=True or decode_detached()",
        )
    if has_digest and not detached:
        raise WireError("bad_flags", "a payload digest (flags bit 2) but no detached payload")
    if reserved != 0:
        raise WireError("bad_flags", f"reserved field is {reserved:#x}, must be 0")
    if not signed and tag != _ZERO_TAG:
        raise WireError("bad_flags", "unsigned message (flags bit 0 clear) with a non-zero tag field")
    if kind != HELLO_KIND or not hello:
        # The digest field means something only for a HELLO and for a detached payload with a digest.
        if not has_digest and digest != _ZERO_DIGEST:
            raise WireError("bad_flags", "digest field set but no payload digest is announced")
        if has_digest and not signed and digest[4:] != _ZERO_DIGEST[4:]:
            raise WireError("bad_flags", "an unsigned payload digest is a crc32: bytes 4..31 must be 0")
    itemsize = _ITEMSIZE_BY_CODE.get(code)
    if itemsize is None:
        raise WireError("bad_dtype", f"unknown payload dtype code {code}")
    if code == 0 and numel != 0:
        raise WireError("shape", f"no-payload dtype code with numel={numel}")
    if code == 0 and detached:
        raise WireError("shape", "detached payload announced with the no-payload dtype code")
    # A detached payload's bytes are elsewhere: the message ends after the clock. A HELLO's dtype and numel
    # describe the sender's transport, not a payload of its own.
    carried = 0 if detached or (hello and kind == HELLO_KIND) else numel * itemsize
    implied = HEADER_SIZE + _CLOCK_ITEMSIZE * n_clock + carried
    # Checked before the buffer length so that a corrupt size field is named as such; both checks come
    # before any allocation, so no header value can make decode allocate more than the bytes received.
    if total != implied:
        raise WireError("bad_length", f"total_length {total} but the header implies {implied} bytes")
    if total > avail:
        raise WireError("truncated", f"message is {total} bytes but only {avail} arrived")

    computed = zlib.crc32(view[:_CRC_OFFSET])
    computed = zlib.crc32(_ZERO_CRC, computed)
    computed = zlib.crc32(view[_CRC_OFFSET + 4 : _TAG_OFFSET], computed)
    computed = zlib.crc32(_ZERO_TAG, computed)
    computed = zlib.crc32(view[HEADER_SIZE:total], computed)
    if computed != crc:
        raise WireError("checksum", "crc32 mismatch: the message was corrupted in transit")

    if key is None:
        if signed:
            raise WireError(
                "auth", "signed message but this worker has no shared secret; give every worker the same key"
            )
    else:
        if not signed:
            raise WireError("auth", "unsigned message but a shared secret is set; give every worker the key")
        if detached and not has_digest:
            raise WireError("auth", "signed message with a detached payload but no payload digest")
        mac = hmac.new(key, view[:_TAG_OFFSET], hashlib.sha256)
        mac.update(_ZERO_TAG)
        mac.update(view[HEADER_SIZE:total])
        if not hmac.compare_digest(mac.digest(), tag):
            raise WireError("auth", "HMAC tag does not match: forged, or the workers' secrets differ")
    return Header(
        kind,
        sender,
        receiver,
        origin,
        seq,
        lo,
        hi,
        _CODE_DTYPES.get(code),
        numel,
        n_clock,
        total,
        detached,
        bytes(nonce),
        bytes(digest) if has_digest or kind == HELLO_KIND else None,
        signed,
    )


def _check_link_fields(head: Header, link: Link, world_size: int) -> None:
    if head.nonce != link.nonce:
        raise WireError(
            "wrong_run", "the message belongs to another run (run nonce differs): recorded, or a stray worker"
        )
    if head.sender >= world_size or head.receiver >= world_size:
        raise WireError(
            "unknown_sender",
            f"sender {head.sender} / receiver {head.receiver} outside a world of {world_size} workers",
        )
    if head.sender != link.sender:
        raise WireError("wrong_sender", f"sender {head.sender} on the link from {link.sender}")
    if head.receiver != link.receiver:
        raise WireError("wrong_receiver", f"addressed to {head.receiver}, received by {link.receiver}")


def decode(
    buf: bytes | bytearray | memoryview,
    *,
    world_size: int,
    link: Link,
    key: bytes | None = None,
    seq: int | None = None,
    expected_numel: int | None = None,
    expected_dtype: torch.dtype | None = None,
    allow_detached: bool = False,
) -> Message:
    """Decode one message from the start of ``buf``, rejecting anything malformed.

    Args:
        buf: received bytes; may be longer than the message (the header's total_length says where it
            ends). A contiguous 1-D uint8 CPU tensor is accepted too.
        world_size: number of workers; sender, receiver and origin must be below it, and a clock must
            have exactly this many entries.
        link: the link the bytes arrived on: the message must carry its nonce, sender and receiver.
        key: shared secret; when given, the message must carry a valid HMAC tag; when None, it must
            carry none.
        seq: the sequence number expected next on the link; None skips the check (tests, tools).
        expected_numel: when given, a payload must have exactly this many elements (control messages,
            which have no payload, are unaffected).
        expected_dtype: when given, a payload must have this dtype (control messages are unaffected).
        allow_detached: accept a header whose payload is detached (flags bit 1); its message comes back
            with ``payload=None``, and ``expected_numel``/``expected_dtype`` apply to the declared
            payload. Use :func:`decode_detached` to learn the declared numel and dtype. When False (the
            default) such a header is rejected with ``bad_flags``.

    Returns:
        The message. Its payload is a fresh 1-D CPU tensor that owns its memory (never a view of
        ``buf``); its clock is a fresh int64 numpy array, or None when the sender sent none.

    Raises:
        WireError: the bytes are rejected; ``reason`` says why (see the module docstring for the order).
        WireUsageError: the arguments themselves are wrong (not a byte buffer, empty key, bad world_size
            or link).
    """
    return _decode(buf, world_size, link, key, seq, expected_numel, expected_dtype, allow_detached).message


def decode_detached(
    buf: bytes | bytearray | memoryview,
    *,
    world_size: int,
    link: Link,
    key: bytes | None = None,
    seq: int | None = None,
    expected_numel: int | None = None,
    expected_dtype: torch.dtype | None = None,
) -> Decoded:
    """Decode one message that may announce a detached payload (flags bit 1), and say which it is.

    Same checks, arguments and errors as :func:`decode` with ``allow_detached=True``; a message with an
    inline payload (or none) is accepted too. For a detached header nothing is allocated from the
    declared numel: the caller checks :attr:`Decoded.numel` and :attr:`Decoded.dtype` (or passes
    ``expected_numel``/``expected_dtype``) before posting a receive of that size, and checks the payload
    that arrives with :func:`verify_payload`.
    """
    return _decode(buf, world_size, link, key, seq, expected_numel, expected_dtype, True)


def _decode(
    buf: bytes | bytearray | memoryview,
    world_size: int,
    link: Link,
    key: bytes | None,
    seq: int | None,
    expected_numel: int | None,
    expected_dtype: torch.dtype | None,
    allow_detached: bool,
) -> Decoded:
    _check_key(key)
    world_size = _check_world(world_size)
    link = _check_link(link)
    if expected_dtype is not None and expected_dtype not in DTYPE_CODES:
        raise WireUsageError(f"expected_dtype {expected_dtype} is not a wire dtype")
    view = _as_bytes_view(buf)

    head = _authentic(view, key, allow_detached, hello=False)
    try:
        _check_link_fields(head, link, world_size)
    except WireError as exc:
        exc.header = head
        raise
    if seq is not None and head.seq != seq:
        raise WireError(
            "replay", f"sequence number {head.seq} on a link that expects {seq}: replayed or reordered", head
        )
    try:
        return _semantics(view, head, world_size, expected_numel, expected_dtype)
    except WireError as exc:
        exc.header, exc.in_sequence = head, seq is not None
        raise


def _semantics(
    view: memoryview,
    head: Header,
    world_size: int,
    expected_numel: int | None,
    expected_dtype: torch.dtype | None,
) -> Decoded:
    """The checks after the link's (kind, origin, range, shape, clock), then the message itself."""
    kind, lo, hi, numel, dtype, n_clock = head.kind, head.lo, head.hi, head.numel, head.dtype, head.n_clock
    if kind not in _VALID_KINDS:
        raise WireError("bad_kind", f"unknown message kind {kind}")
    kind_e = Kind(kind)
    if head.origin >= world_size:
        raise WireError("unknown_sender", f"origin {head.origin} outside a world of {world_size} workers")
    if lo > MAX_ID or hi > MAX_ID:
        raise WireError(
            "bad_range", f"id range [{lo}, {hi}) goes past 2**63-1, the largest count a vector clock holds"
        )
    if kind_e == Kind.GRADIENT:
        range_ok = lo < hi
    elif kind_e in (Kind.FINAL, Kind.MARKER):
        range_ok = lo == hi
    elif kind_e == Kind.MODEL:
        range_ok = lo <= hi
    else:
        range_ok = lo == 0 and hi == 0
    if not range_ok:
        raise WireError("bad_range", f"id range [{lo}, {hi}) is invalid for {kind_e.name}")
    has_payload = dtype is not None
    if has_payload != (kind_e in _PAYLOAD_KINDS):
        need = "needs a payload" if kind_e in _PAYLOAD_KINDS else "must not carry a payload"
        raise WireError("shape", f"{kind_e.name} {need}")
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
    if dtype is not None and not head.detached:
        payload = torch.empty(numel, dtype=dtype)
        if numel:
            start = HEADER_SIZE + _CLOCK_ITEMSIZE * n_clock
            src = np.frombuffer(view, dtype=np.uint8, count=numel * dtype.itemsize, offset=start)
            np.copyto(payload.view(torch.uint8).numpy(), src)
    message = Message(kind_e, head.sender, head.origin, lo, hi, payload, clock)
    return Decoded(message, head.detached, numel, dtype, head)


def verify_payload(header: Header, payload: torch.Tensor) -> None:
    """Check a detached payload that arrived for ``header`` (from :func:`decode_detached`).

    The payload must have the header's element count and dtype, and, when the header carries a digest,
    match it. A header without a digest (unsigned, flags bit 2 clear) leaves integrity to the data plane.

    Raises:
        WireError: ``shape`` or ``bad_dtype`` when the tensor is not what the header announced (a bug on
            the receiving side, reported the same way), ``bad_digest`` when its bytes differ from what the
            sender hashed (altered or corrupted on the way, or sent for another header).
        WireUsageError: ``header`` announces no detached payload.
    """
    if not header.detached:
        raise WireUsageError("verify_payload needs the header of a detached payload")
    if payload.numel() != header.numel:
        raise WireError("shape", f"payload has {payload.numel()} elements, the header says {header.numel}")
    if payload.dtype != header.dtype:
        raise WireError("bad_dtype", f"payload dtype {payload.dtype}, the header says {header.dtype}")
    if header.digest is None:
        return
    if not hmac.compare_digest(payload_digest(payload, header.signed), header.digest):
        raise WireError(
            "bad_digest", "the detached payload does not match its header's digest: altered on the way"
        )


def check_hello(
    buf: bytes | bytearray | memoryview,
    *,
    link: Link,
    key: bytes | None,
    world_size: int,
    numel: int,
    dtype: torch.dtype,
    spec_digest: bytes,
) -> Header:
    """Check the HELLO a peer opened ``link`` with against this worker's own settings.

    Args:
        buf: the received bytes (a HELLO is :data:`HEADER_SIZE` bytes; more may follow in the buffer).
        link: the link it arrived on (the run nonce, the peer as sender, this worker as receiver).
        key: this worker's shared secret, or None.
        world_size, numel, dtype, spec_digest: this worker's settings (as in :func:`encode_hello`).

    Returns:
        The HELLO's header.

    Raises:
        WireError: the peer is refused. ``reason`` is ``bad_version`` (another wire version), ``auth``
            (it has no key where we have one, one where we have none, or another key), ``wrong_run``
            (another run nonce), ``wrong_sender``/``wrong_receiver``/``unknown_sender`` (not this link),
            ``bad_kind`` (the first message is not a HELLO), ``replay`` (its seq is not 0),
            ``spec_mismatch`` (another world size, payload or spec), or a structural reason for bytes
            that are not a well-formed message. The detail names both sides' values where it can.
    """
    _check_key(key)
    world_size = _check_world(world_size)
    link = _check_link(link, world_size)
    view = _as_bytes_view(buf)
    head = _authentic(view, key, allow_detached=False, hello=True)
    if head.kind != HELLO_KIND:
        raise WireError("bad_kind", f"the link must open with a HELLO, got kind {head.kind}", head)
    if head.n_clock or head.total_length != HEADER_SIZE:
        raise WireError("bad_length", "a HELLO is exactly the header", head)
    try:
        _check_link_fields(head, link, world_size)
    except WireError as exc:
        exc.header = head
        raise
    if head.seq != 0:
        raise WireError("replay", f"a HELLO is message 0 of its link, got {head.seq}", head)
    if head.lo != world_size:
        raise WireError("spec_mismatch", f"world size {head.lo} there, {world_size} here", head)
    if head.numel != numel or head.dtype != dtype:
        raise WireError(
            "spec_mismatch",
            f"payload {head.numel} x {head.dtype} there, {numel} x {dtype} here (model size or dtype)",
            head,
        )
    if head.digest != bytes(spec_digest):
        raise WireError(
            "spec_mismatch",
            f"spec digest {(head.digest or b'').hex()[:12]}... there, {bytes(spec_digest).hex()[:12]}... "
            "here (task, model, workers, algorithm or transport differ)",
            head,
        )
    return head
