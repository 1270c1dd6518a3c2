"""
What the demo's applications write: the numbered, checksummed message
contents, and each receiver's record of what it was delivered.

Pure encoding and decoding, plus the record file of one receiving node
(append-only, one fixed-size record per delivery, written with ``os.write``
before ``deliver`` returns, so that a SIGKILL keeps every record of a
delivery the application had finished: the write is in the kernel's page
cache before ILM can record the delivery in its store).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator

import attr

# Message contents: number (u64), send time (CLOCK_MONOTONIC ns, u64), a
# fixed filler, then a CRC-32 of everything before it: 64 bytes in all.
_HEAD = struct.Struct(">QQ")
_CRC = struct.Struct(">I")
_FILLER = b"ILM demo: once, in order, across cuts & -9.\n"
MESSAGE_SIZE = _HEAD.size + len(_FILLER) + _CRC.size
assert MESSAGE_SIZE == 64

# One delivery: position (message_id), number (CORRUPT if the contents did
# not check out), send time, delivery time.  A record at position 0 marks
# the start of a receiver process: its number field is the process id and
# its send-time field how many bytes of a record torn by the previous
# process's death were cut off.
RECORD = struct.Struct("<QQqq")
CORRUPT = 2**64 - 1
START = 0


def encode(number: int, sent_ns: int) -> bytes:
    """
    :return: the contents of message ``number``, sent at ``sent_ns``.
    """
    body = _HEAD.pack(number, sent_ns) + _FILLER
    return body + _CRC.pack(zlib.crc32(body))


def decode(contents: bytes) -> tuple[int, int] | None:
    """
    :return: ``(number, sent_ns)`` of message contents made by
        :func:`encode`, or ``None`` if they do not check out (wrong size or
        checksum).
    """
    if len(contents) != MESSAGE_SIZE:
        return None
    body = contents[: -_CRC.size]
    if _CRC.unpack(contents[-_CRC.size :])[0] != zlib.crc32(body):
        return None
    number, sent_ns = _HEAD.unpack_from(body)
    return number, sent_ns


class RecordWriter:
    """
    The record file of one receiver process: opened for appending (cutting
    off a record torn by the previous process's death), started with a
    start record, then one record per delivery.
    """

    def __init__(self, path: str, pid: int, now_ns: int) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        size = os.fstat(self._fd).st_size
        torn = size % RECORD.size
        if torn:
            os.ftruncate(self._fd, size - torn)
        #: The highest number recorded by earlier processes (0 if none).
        self.highest = 0
        with open(self._fd, "rb", closefd=False) as f:
            data = f.read(size - torn)
        for position, number, _, _ in RECORD.iter_unpack(data):
            if position != START and number != CORRUPT and number > self.highest:
                self.highest = number
        os.write(self._fd, RECORD.pack(START, pid, torn, now_ns))

    def delivered(
        self, position: int, number: int | None, sent_ns: int, received_ns: int
    ) -> None:
        """
        Record a delivery (``number`` ``None``: the contents did not check
        out).
        """
        os.write(
            self._fd,
            RECORD.pack(
                position, CORRUPT if number is None else number, sent_ns, received_ns
            ),
        )

    def close(self) -> None:
        os.close(self._fd)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ProcessRecords:
    """
    The records one receiver process wrote.

    ``deliveries`` are ``(position, number, sent_ns, received_ns)`` tuples,
    ``number`` ``None`` where the contents did not check out.
    """

    pid: int
    torn_bytes: int
    deliveries: tuple[tuple[int, int | None, int, int], ...]


def parse_records(data: bytes) -> list[ProcessRecords]:
    """
    Split a record file's bytes into its processes' records.  A torn record
    at the very end (the last process died writing it) is left out: that
    delivery had not finished.

    :raises ValueError: if the file does not begin with a start record.
    """
    end = len(data) - len(data) % RECORD.size
    processes: list[ProcessRecords] = []
    current: list[tuple[int, int | None, int, int]] = []
    pid = torn = -1
    for position, number, sent_ns, received_ns in _records(data[:end]):
        if position == START:
            if pid != -1:
                processes.append(ProcessRecords(pid, torn, tuple(current)))
            pid, torn, current = number, sent_ns, []
        elif pid == -1:
            raise ValueError("the record file does not begin with a start record")
        else:
            current.append(
                (position, None if number == CORRUPT else number, sent_ns, received_ns)
            )
    if pid != -1:
        processes.append(ProcessRecords(pid, torn, tuple(current)))
    return processes


def _records(data: bytes) -> Iterator[tuple[int, int, int, int]]:
    return RECORD.iter_unpack(data)
