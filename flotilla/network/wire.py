"""What goes over the wire: method names, message classes, chunking, auth metadata.

The messages are defined in ``flotilla.proto`` and compiled into the committed
``flotilla_pb2.py`` (protobuf >= 7.35.1, < 8).  After editing the .proto, regenerate with
grpcio-tools 1.85 (a development-time tool only)::

    python -m grpc_tools.protoc -I flotilla/network --python_out=flotilla/network flotilla/network/flotilla.proto

The service is registered with ``grpc.method_handlers_generic_handler`` (server) and called
with ``channel.unary_unary`` and friends (client), so no generated service stubs are needed.
Tensors travel as raw little-endian float32 bytes split into chunks of at most ``chunk_bytes``,
so a model of any size fits under gRPC's per-message limit.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator

import grpc

from flotilla.network import flotilla_pb2 as pb

if sys.byteorder != "little":  # the wire format is little-endian float32, as torch stores it here
    raise ImportError("flotilla.network needs a little-endian machine")

SERVICE = "flotilla.v1.Flotilla"
CHECK_IN = f"/{SERVICE}/CheckIn"
DOWNLOAD = f"/{SERVICE}/Download"
UPLOAD = f"/{SERVICE}/Upload"
STATUS = f"/{SERVICE}/Status"
SECAGG_STEP = f"/{SERVICE}/SecAggStep"  # sync secure aggregation: JSON bytes both ways (flotilla.network.secagg)

AUTH_HEADER = "authorization"  # metadata: "Bearer <token>"
DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB per chunk
DEFAULT_MAX_MESSAGE_BYTES = 4 << 20  # per gRPC message (gRPC's own default)
# what a device's SDK understands, sent with every check-in: "2" adds the assignment's
# aggregator_data_port (scale-out aggregators' data planes), withheld from older SDKs, whose
# ClientSpec would refuse the unknown key; data-plane check-ins need no version (the port is the sign)
SDK_VERSION = "2"
AGGREGATOR_DATA_PORT_SDK = 2

COMPRESSION = {
    "none": grpc.Compression.NoCompression,
    "gzip": grpc.Compression.Gzip,
    "deflate": grpc.Compression.Deflate,
}


def compression(name: str | None) -> grpc.Compression:
    name = name or "none"
    if name not in COMPRESSION:
        raise ValueError(f"compression: must be one of {sorted(COMPRESSION)}, got {name!r}")
    return COMPRESSION[name]


def chunks(data: bytes | memoryview, chunk_bytes: int) -> Iterator[memoryview]:
    """Consecutive slices of at most ``chunk_bytes`` (views: no copies)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes: must be >= 1, got {chunk_bytes}")
    view = memoryview(data).cast("B")
    for start in range(0, len(view), chunk_bytes):
        yield view[start : start + chunk_bytes]


def model_chunks(version: int, data: bytes | memoryview, chunk_bytes: int) -> list[bytes]:
    """The serialised ``ModelChunk`` messages of a model download, in order.  The server builds them
    once per served version and hands the same bytes to every device (a raw response serialiser)."""
    view = memoryview(data).cast("B")
    total = len(view)
    return [
        pb.ModelChunk(version=version, offset=off, total_bytes=total, data=bytes(part)).SerializeToString()
        for off, part in zip(range(0, total, chunk_bytes), chunks(view, chunk_bytes))
    ]


_DATA_TAG = 0x12  # UploadPart.data: field 2, wire type 2 (length-delimited)


class DataPart:
    """An ``UploadPart`` whose one field is ``data``; ``data`` is a view into the received message."""

    __slots__ = ("data",)

    def __init__(self, data: memoryview):
        self.data = data

    def WhichOneof(self, name: str) -> str | None:  # as the protobuf message answers
        return "data" if name == "part" else None


def parse_upload_part(raw: bytes) -> DataPart | pb.UploadPart:
    """``pb.UploadPart.FromString(raw)``, without protobuf's two copies of the delta's bytes for the
    message nearly every part is: exactly one ``data`` field (its tag, a varint length, then that
    many bytes to the end).  Protobuf parses a message of that form to the same ``data``; anything
    else (a header, other fields, a length that does not match) is parsed by protobuf itself and
    raises as it does."""
    if len(raw) > 1 and raw[0] == _DATA_TAG:
        n = shift = 0
        for i in range(1, min(len(raw), 11)):  # a varint has at most 10 bytes
            b = raw[i]
            n |= (b & 0x7F) << shift
            if b < 0x80:
                if i + 1 + n == len(raw):
                    return DataPart(memoryview(raw)[i + 1 :])
                break
            shift += 7
    return pb.UploadPart.FromString(raw)


# The data plane's frames (flotilla.network.dataplane and dataplane_client): a 4-byte big-endian
# length, then a DataRequest or DataReply.  One definition for both ends.
FRAME_LEN = struct.Struct(">I")
MAX_FRAME_BYTES = 64 << 10  # a request or reply is a token and a header: far below this
DATA_SOCKET_BUFFER = 4 << 20  # measured: 4 MiB kernel buffers cut the data threads' CPU per trip by ~15%


class PeerClosed(ConnectionError):
    """The other end hung up (or the connection was cut) mid-read; ``got`` bytes had arrived."""

    def __init__(self, got: int, wanted: int):
        super().__init__(f"the peer closed the connection after {got} of {wanted} bytes")
        self.got = got


class FrameTooLong(ConnectionError):
    def __init__(self, size: int):
        super().__init__(f"a frame of {size} bytes, over the limit of {MAX_FRAME_BYTES}")


def frame(message) -> bytes:
    data = message.SerializeToString()
    return FRAME_LEN.pack(len(data)) + data


def read_exact(sock, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise PeerClosed(got, len(view))
        got += n


def read_frame(sock, first: int | None = None) -> bytes:
    """One frame's message bytes (``first``: its first length byte, when the caller read it already)."""
    head = bytearray(4)
    if first is None:
        read_exact(sock, memoryview(head))
    else:
        head[0] = first
        read_exact(sock, memoryview(head)[1:])
    (size,) = FRAME_LEN.unpack(head)
    if size > MAX_FRAME_BYTES:
        raise FrameTooLong(size)
    body = bytearray(size)
    read_exact(sock, memoryview(body))
    return bytes(body)


# gRPC's own reconnect backoff (1 s growing to 120 s by default) runs under the SDK's Backoff: a
# channel that saw a server go away fails every call fast until *its* timer fires, so after an
# outage of a minute a device could not reach the server for another minute or two, and miss the
# `linger_s` window in which a finished server says DONE.  Capped at the SDK's Backoff.max_s.
RECONNECT_INITIAL_MS, RECONNECT_MAX_MS = 200, 5000


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_INITIAL_MS),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_INITIAL_MS),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_MS),
    ]


__all__ = [
    "pb",
    "SERVICE",
    "CHECK_IN",
    "DOWNLOAD",
    "UPLOAD",
    "STATUS",
    "AUTH_HEADER",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "SDK_VERSION",
    "AGGREGATOR_DATA_PORT_SDK",
    "chunks",
    "model_chunks",
    "DataPart",
    "parse_upload_part",
    "channel_options",
    "FRAME_LEN",
    "MAX_FRAME_BYTES",
    "DATA_SOCKET_BUFFER",
    "PeerClosed",
    "FrameTooLong",
    "frame",
    "read_exact",
    "read_frame",
    "compression",
]
