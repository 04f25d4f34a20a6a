"""HTTP/2 frames and HPACK header blocks, as much as relaying gRPC calls needs (RFC 9113, 7541).

Frames are cut from a byte stream by `FrameReader` and written whole by `frame`. Header blocks
are decoded in full by `HpackDecoder` (static and dynamic tables, Huffman-coded strings, table
size updates) and encoded by `encode_headers` without the dynamic table: a field the static
table holds whole is one index, any other a literal that is never indexed and never Huffman
coded. The encoder therefore keeps no state, and the peer's decoder has none to keep in step.

Errors::

    H2Error        the peer broke the protocol; `code` is the HTTP/2 error code to send
    └── HpackError a header block that does not decode (COMPRESSION_ERROR)
"""

from __future__ import annotations

import struct
from collections import deque

from hpack.exceptions import HPACKDecodingError
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9

END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x6, 0x7, 0x8, 0x9

SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_WINDOW = 2**31 - 1

_HEAD = struct.Struct(">BHBBI")
_SETTING = struct.Struct(">HI")
_U32 = struct.Struct(">I")


class H2Error(Exception):
    """The peer broke the protocol."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class HpackError(H2Error):
    """A header block that does not decode."""

    def __init__(self, message: str) -> None:
        super().__init__(COMPRESSION_ERROR, message)


Frame = tuple[int, int, int, bytes]


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One frame: its 9-byte head, then `payload`."""
    n = len(payload)
    return _HEAD.pack(n >> 16, n & 0xFFFF, ftype, flags, stream_id) + payload


def settings_frame(pairs: list[tuple[int, int]]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in pairs))


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, _U32.pack(code))


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, _U32.pack(last_stream_id) + _U32.pack(code) + debug)


def header_frames(stream_id: int, block: bytes, end_stream: bool, max_frame: int) -> bytes:
    """A header block as HEADERS, then CONTINUATION frames where it is over `max_frame`."""
    flags = END_STREAM if end_stream else 0
    if len(block) <= max_frame:
        return frame(HEADERS, flags | END_HEADERS, stream_id, block)
    parts = [block[i : i + max_frame] for i in range(0, len(block), max_frame)]
    out = [frame(HEADERS, flags, stream_id, parts[0])]
    for part in parts[1:-1]:
        out.append(frame(CONTINUATION, 0, stream_id, part))
    out.append(frame(CONTINUATION, END_HEADERS, stream_id, parts[-1]))
    return b"".join(out)


def parse_settings(payload: bytes) -> list[tuple[int, int]]:
    if len(payload) % 6:
        raise H2Error(FRAME_SIZE_ERROR, "a SETTINGS frame whose length is not a multiple of 6")
    return [_SETTING.unpack_from(payload, i) for i in range(0, len(payload), 6)]


def parse_u32(payload: bytes) -> int:
    """The 31-bit value of a WINDOW_UPDATE or the code of a RST_STREAM (4-byte payloads)."""
    if len(payload) != 4:
        raise H2Error(FRAME_SIZE_ERROR, "a 4-byte frame of another length")
    value: int = _U32.unpack(payload)[0]
    return value


def unpad(payload: bytes, flags: int) -> bytes:
    """A DATA or HEADERS payload without its padding (and a HEADERS' priority fields)."""
    start, end = 0, len(payload)
    if flags & PADDED:
        if not payload:
            raise H2Error(PROTOCOL_ERROR, "a padded frame with no pad length")
        start, end = 1, end - payload[0]
    return payload[start:end] if start or end != len(payload) else payload


def header_block(payload: bytes, flags: int) -> bytes:
    """A HEADERS payload's header block fragment."""
    block = unpad(payload, flags)
    if flags & PRIORITY_FLAG:
        block = block[5:]
    return block


class FrameReader:
    """Cuts frames from the bytes of a connection as they arrive."""

    __slots__ = ("_rest", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._rest = b""
        self.max_frame = max_frame

    def feed(self, data: bytes) -> list[Frame]:
        if self._rest:
            data = self._rest + data
        frames: list[Frame] = []
        pos, end = 0, len(data)
        while end - pos >= 9:
            hi, lo, ftype, flags, sid = _HEAD.unpack_from(data, pos)
            length = hi << 16 | lo
            if length > self.max_frame:
                raise H2Error(FRAME_SIZE_ERROR, f"a frame of {length} bytes")
            if end - pos - 9 < length:
                break
            frames.append((ftype, flags, sid & 0x7FFFFFFF, data[pos + 9 : pos + 9 + length]))
            pos += 9 + length
        self._rest = data[pos:] if pos < end else b""
        return frames


STATIC: list[tuple[str, str]] = [
    (n.decode("latin-1"), v.decode("latin-1")) for n, v in HeaderTable.STATIC_TABLE
]
_STATIC_FIELD = {field: i for i, field in enumerate(STATIC, 1) if field[1]}
_STATIC_NAME: dict[str, int] = {}
for _i, (_name, _) in enumerate(STATIC, 1):
    _STATIC_NAME.setdefault(_name, _i)


def _integer(data: bytes, pos: int, prefix: int) -> tuple[int, int]:
    mask = (1 << prefix) - 1
    if pos >= len(data):
        raise HpackError("a header block cut short")
    value = data[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    while True:
        if pos >= len(data) or shift > 28:
            raise HpackError("an integer cut short or too large")
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _string(data: bytes, pos: int) -> tuple[str, int]:
    if pos >= len(data):
        raise HpackError("a header block cut short")
    huffman = data[pos] & 0x80
    length, pos = _integer(data, pos, 7)
    end = pos + length
    if end > len(data):
        raise HpackError("a string longer than its header block")
    raw = data[pos:end]
    if huffman:
        try:
            raw = decode_huffman(raw)
        except HPACKDecodingError as exc:
            raise HpackError(f"a Huffman string that does not decode: {exc}") from exc
    return raw.decode("latin-1"), end


class HpackDecoder:
    """One connection's decoding context: its dynamic table, in the order blocks arrive."""

    __slots__ = ("_dynamic", "_limit", "_max", "_size", "max_list")

    def __init__(self, table_size: int = 4096, max_list: int = 65_536) -> None:
        self._dynamic: deque[tuple[str, str]] = deque()
        self._size = 0
        self._max = self._limit = table_size
        self.max_list = max_list

    def _get(self, index: int) -> tuple[str, str]:
        if 0 < index <= len(STATIC):
            return STATIC[index - 1]
        i = index - len(STATIC) - 1
        if 0 <= i < len(self._dynamic):
            return self._dynamic[i]
        raise HpackError(f"no header table entry {index}")

    def _evict(self) -> None:
        while self._size > self._max:
            name, value = self._dynamic.pop()
            self._size -= 32 + len(name) + len(value)

    def _add(self, name: str, value: str) -> None:
        size = 32 + len(name) + len(value)
        if size > self._max:
            self._dynamic.clear()
            self._size = 0
            return
        self._dynamic.appendleft((name, value))
        self._size += size
        self._evict()

    def _literal(self, block: bytes, pos: int, prefix: int) -> tuple[tuple[str, str], int]:
        """A literal field: its name by index (or as a string), then its value."""
        index, pos = _integer(block, pos, prefix)
        if index:
            name = self._get(index)[0]
        else:
            name, pos = _string(block, pos)
        value, pos = _string(block, pos)
        return (name, value), pos

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        """The fields of one whole header block, names and values as latin-1 text."""
        out: list[tuple[str, str]] = []
        pos, end, total = 0, len(block), 0
        while pos < end:
            byte = block[pos]
            if byte & 0x80:  # indexed field
                index, pos = _integer(block, pos, 7)
                field = self._get(index)
            elif byte & 0x40:  # literal, added to the table
                field, pos = self._literal(block, pos, 6)
                self._add(*field)
            elif byte & 0x20:  # dynamic table size update
                size, pos = _integer(block, pos, 5)
                if size > self._limit:
                    raise HpackError(f"a table size of {size} over {self._limit}")
                self._max = size
                self._evict()
                continue
            else:  # literal, not indexed or never indexed
                field, pos = self._literal(block, pos, 4)
            total += 32 + len(field[0]) + len(field[1])
            if total > self.max_list:
                raise HpackError(f"a header list over {self.max_list} bytes")
            out.append(field)
        return out


def _encode_integer(value: int, prefix: int, first: int) -> bytes:
    mask = (1 << prefix) - 1
    if value < mask:
        return bytes((first | value,))
    out = bytearray((first | mask,))
    value -= mask
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _encode_string(text: str) -> bytes:
    raw = text.encode("latin-1", "replace")
    return _encode_integer(len(raw), 7, 0) + raw


_ENCODED: dict[tuple[str, str], bytes] = {}
_ENCODED_MAX = 2048


def encode_field(name: str, value: str) -> bytes:
    field = (name, value)
    known = _ENCODED.get(field)
    if known is not None:
        return known
    index = _STATIC_FIELD.get(field)
    if index is not None:
        out = _encode_integer(index, 7, 0x80)
    else:
        name_index = _STATIC_NAME.get(name, 0)
        out = _encode_integer(name_index, 4, 0)
        if not name_index:
            out += _encode_string(name)
        out += _encode_string(value)
    if len(_ENCODED) >= _ENCODED_MAX:
        _ENCODED.clear()  # values that change per call (timeouts, messages) fill it
    _ENCODED[field] = out
    return out


def encode_headers(fields: list[tuple[str, str]]) -> bytes:
    """A header block any decoder reads without a dynamic table of ours."""
    return b"".join([encode_field(name, value) for name, value in fields])


def percent_encode(message: str) -> str:
    """A grpc-message value: UTF-8, with bytes outside printable ASCII and '%' escaped."""
    raw = message.encode("utf-8", "replace")
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return message
    return "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in raw)
