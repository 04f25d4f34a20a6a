"""HTTP/2 framing and HPACK of the gRPC relay, against RFC 7541's examples and the hpack package."""

from __future__ import annotations

import hpack
import pytest

from control_plane import h2_wire as h2
from control_plane.grpc_relay import _Sizer, error_block

# RFC 7541 C.4: three requests, Huffman coded, one decoding context.
RFC_C4 = [
    (
        "828684418cf1e3c2e5f23a6ba0ab90f4ff",
        [(":method", "GET"), (":scheme", "http"), (":path", "/"),
         (":authority", "www.example.com")],
    ),
    (
        "828684be5886a8eb10649cbf",
        [(":method", "GET"), (":scheme", "http"), (":path", "/"),
         (":authority", "www.example.com"), ("cache-control", "no-cache")],
    ),
    (
        "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
        [(":method", "GET"), (":scheme", "https"), (":path", "/index.html"),
         (":authority", "www.example.com"), ("custom-key", "custom-value")],
    ),
]  # fmt: skip


def test_the_rfc_examples_decode_in_one_context() -> None:
    decoder = h2.HpackDecoder()
    for block, fields in RFC_C4:
        assert decoder.decode(bytes.fromhex(block)) == fields


def test_blocks_of_the_hpack_encoder_decode_with_the_dynamic_table_and_size_updates() -> None:
    encoder, decoder = hpack.Encoder(), h2.HpackDecoder()
    calls = [
        [
            (":method", "POST"),
            (":path", f"/pkg.Service/Method{i % 3}"),
            ("content-type", "application/grpc"),
            ("authorization", "Key " + "k" * 40),
            ("grpc-timeout", f"{i}m"),
            ("x-bin", "é" * i),
        ]
        for i in range(40)
    ]
    for i, fields in enumerate(calls):
        if i == 20:
            encoder.header_table_size = 256  # emits a table size update, evicting entries
        block = encoder.encode(fields, huffman=i % 2 == 0)
        # Names and values come back as latin-1 text: their bytes, whatever they are.
        decoded = decoder.decode(block)
        assert decoded == [(n, v.encode().decode("latin-1")) for n, v in fields]
        assert hpack.Decoder().decode(h2.encode_headers(decoded)) == fields


def test_encoded_headers_decode_without_a_table_of_ours() -> None:
    fields = [
        (":status", "200"),
        ("content-type", "application/grpc"),
        ("grpc-status", "8"),
        ("grpc-message", h2.percent_encode("over 100% — full")),
        ("x-long", "v" * 300),
    ]
    block = h2.encode_headers(fields)
    assert block[0] == 0x88  # ":status: 200" is one index of the static table
    decoded = hpack.Decoder().decode(block)
    assert decoded == fields
    assert decoded[3][1] == "over 100%25 %E2%80%94 full"
    assert hpack.Decoder().decode(error_block(14, "gone", replied=True, retry_after="1")) == [
        ("grpc-status", "14"),
        ("grpc-message", "gone"),
        ("retry-after", "1"),
    ]


@pytest.mark.parametrize(
    "block",
    [
        "80",  # index 0
        "bf",  # a dynamic entry that is not there
        "41",  # a literal cut short
        "418cf1e3",  # a string longer than the block
        "3fe21f",  # a table size update over the limit (4097)
        "1f808080808080",  # an integer too large
        "0085ffffffffff",  # a Huffman string with an EOS code
    ],
)
def test_a_block_that_does_not_decode_is_a_compression_error(block: str) -> None:
    with pytest.raises(h2.HpackError) as info:
        h2.HpackDecoder().decode(bytes.fromhex(block))
    assert info.value.code == h2.COMPRESSION_ERROR


def test_a_header_list_over_its_limit_is_refused() -> None:
    block = h2.encode_headers([("x-big", "v" * 2000)])
    with pytest.raises(h2.HpackError, match="header list over 1000"):
        h2.HpackDecoder(max_list=1000).decode(block)


def test_frames_are_cut_however_the_bytes_arrive() -> None:
    frames = [
        h2.frame(h2.HEADERS, h2.END_HEADERS, 1, b"abc"),
        h2.frame(h2.DATA, h2.END_STREAM, 1, b"x" * 1000),
        h2.window_update(0, 12345),
        h2.frame(h2.PING, 0, 0, b"12345678"),
    ]
    wire = b"".join(frames)
    for step in (1, 7, 9, 100, len(wire)):
        reader, got = h2.FrameReader(), []
        for i in range(0, len(wire), step):
            got.extend(reader.feed(wire[i : i + step]))
        assert got == [
            (h2.HEADERS, h2.END_HEADERS, 1, b"abc"),
            (h2.DATA, h2.END_STREAM, 1, b"x" * 1000),
            (h2.WINDOW_UPDATE, 0, 0, (12345).to_bytes(4, "big")),
            (h2.PING, 0, 0, b"12345678"),
        ]
    with pytest.raises(h2.H2Error) as info:
        h2.FrameReader().feed(h2.frame(h2.DATA, 0, 1, b"y" * 20_000))
    assert info.value.code == h2.FRAME_SIZE_ERROR


def test_padding_priority_and_continuation() -> None:
    assert h2.unpad(b"\x03abcPPP", h2.PADDED) == b"abc"
    assert h2.header_block(b"\x02" + b"\x00" * 5 + b"blk" + b"PP", h2.PADDED | 0x20) == b"blk"
    wire = h2.header_frames(3, b"b" * 40_000, True, 16_384)
    frames = h2.FrameReader().feed(wire)
    assert [(t, f) for t, f, _, _ in frames] == [
        (h2.HEADERS, h2.END_STREAM),
        (h2.CONTINUATION, 0),
        (h2.CONTINUATION, h2.END_HEADERS),
    ]
    assert b"".join(p for *_, p in frames) == b"b" * 40_000
    with pytest.raises(h2.H2Error):
        h2.parse_settings(b"\x00\x04\x00")


def test_message_boundaries_are_found_across_frames() -> None:
    sizer = _Sizer()
    message = b"\x00" + (300).to_bytes(4, "big") + b"m" * 300
    second = b"\x00" + (70_000).to_bytes(4, "big")
    wire = message + second
    assert sizer.largest(wire[:3]) == -1  # the prefix is cut
    assert sizer.largest(wire[3:200]) == 300
    assert sizer.largest(wire[200:]) == 70_000
    assert sizer.largest(b"z" * 70_000) == -1  # the second body
    assert sizer.largest(b"\x01\x00\x00\x00\x02ab") == 2
