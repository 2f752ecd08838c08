"""The client's half of the wire protocol: checks and encodes commands, splits and parses reply lines.

Shared by ``Client`` and ``AsyncClient``. Work is done on whole buffers with
``bytes`` methods (``find``, ``split``, ``count``, ``%``), which run in C: no
Python loop ever walks a line byte by byte.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import NamedTuple, cast

from pigeon.errors import CommandError, InvalidArgumentError
from pigeon.protocol import TOPIC_MAX

# The server refuses these in a topic (whitespace, C0/C1 controls, the common
# Unicode blanks); checking here gives the error before anything is sent.
_BAD_TOPIC_CHAR = re.compile("[\x00-\x20\x7f-\x9f\xa0\u2028\u2029]")

Bytes = bytes | bytearray | memoryview
Data = Bytes | str


class Message(NamedTuple):
    """One delivery: the topic it was published to and its bytes."""

    topic: str
    data: bytes

    @property
    def text(self) -> str:
        """The data decoded as UTF-8."""
        return self.data.decode()


@dataclasses.dataclass(frozen=True, slots=True)
class Refused:
    """A pipelined publish the server did not accept: its position in the batch and why."""

    index: int
    error: CommandError | Exception


_topic_cache: dict[str | bytes, bytes] = {}
TOPIC_CACHE_MAX = 4096


def encode_topic(topic: str | bytes) -> bytes:
    """The topic as wire bytes; raises InvalidArgumentError for a name the server would refuse."""
    # a publisher names the same few topics over and over: check each once
    try:
        return _topic_cache[topic]
    except (KeyError, TypeError):  # TypeError: unhashable, so certainly not a topic
        pass
    raw = _check_topic(topic)
    if len(_topic_cache) >= TOPIC_CACHE_MAX:
        _topic_cache.clear()
    _topic_cache[topic] = raw
    return raw


def _check_topic(topic: str | bytes) -> bytes:
    if isinstance(topic, str):
        text = topic
        try:
            raw = topic.encode()
        except UnicodeEncodeError:
            raise InvalidArgumentError(f"topic {topic!r} is not valid Unicode") from None
    elif isinstance(topic, bytes):
        raw = topic
        try:
            text = topic.decode()
        except UnicodeDecodeError:
            raise InvalidArgumentError(f"topic {topic!r} is not valid UTF-8") from None
    else:
        raise InvalidArgumentError(f"topic must be str or bytes, not {type(topic).__name__}")
    if not raw:
        raise InvalidArgumentError("topic must not be empty")
    if len(raw) > TOPIC_MAX:
        raise InvalidArgumentError(f"topic must be at most {TOPIC_MAX} bytes, not {len(raw)}")
    if _BAD_TOPIC_CHAR.search(text):
        raise InvalidArgumentError(f"topic {text!r} must not contain whitespace or control characters")
    return raw


def encode_message(message: Data) -> bytes:
    """The message as wire bytes; raises InvalidArgumentError for one that cannot fit on one line."""
    data = message if type(message) is bytes else _as_bytes(message)
    if b"\n" in data:
        raise InvalidArgumentError("message must not contain a newline (one message is one line)")
    if data.endswith(b"\r"):
        # the server reads "\r\n" as a line end, so a trailing "\r" would be lost
        raise InvalidArgumentError("message must not end with a carriage return")
    return data


def encode_messages(messages: Iterable[Data]) -> list[Bytes]:
    """Many messages as wire bytes, checked together at C speed; the error names the first bad one.

    A list of bytes-like messages is used as it is: no Python step per message.
    """
    items = messages if isinstance(messages, list) else list(messages)
    try:
        # join raises TypeError unless every item is bytes-like: then the list is the answer
        data = cast("list[Bytes]", items)
        joined = b"".join(data)
    except TypeError:
        data = [m if type(m) is bytes else _as_bytes(m) for m in items]
        joined = b"".join(data)
    # two memchr scans; only a message with a "\r" somewhere needs a closer look
    if b"\n" in joined or b"\r" in joined:
        for index, message in enumerate(data):
            try:
                encode_message(message)
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(f"message {index}: {exc}") from None
    return data


def _as_bytes(message: Data) -> bytes:
    if isinstance(message, str):
        return message.encode()
    if isinstance(message, (bytearray, memoryview)):
        return bytes(message)
    if isinstance(message, bytes):  # a bytes subclass
        return bytes(message)
    raise InvalidArgumentError(f"message must be bytes or str, not {type(message).__name__}")


def connect_line() -> bytes:
    """The CONNECT command."""
    return b"CONNECT\n"


def subscribe_line(client_id: bytes, topic: bytes) -> bytes:
    """SUBSCRIBE for an encoded topic."""
    return b"SUBSCRIBE %s %s\n" % (client_id, topic)


def unsubscribe_line(client_id: bytes, topic: bytes) -> bytes:
    """UNSUBSCRIBE for an encoded topic."""
    return b"UNSUBSCRIBE %s %s\n" % (client_id, topic)


def publish_line(client_id: bytes, topic: bytes, data: bytes) -> bytes:
    """PUBLISH for an encoded topic and message."""
    return b"PUBLISH %s %s %s\n" % (client_id, topic, data)


def publish_chunk(client_id: bytes, topic: bytes, messages: list[Bytes]) -> bytes:
    """PUBLISH commands for many encoded messages on one topic, as one buffer built by one join."""
    head = b"PUBLISH %s %s " % (client_id, topic)
    return head + (b"\n" + head).join(messages) + b"\n"


def ping_line() -> bytes:
    """The PING command."""
    return b"PING\n"


def disconnect_line() -> bytes:
    """The DISCONNECT command."""
    return b"DISCONNECT\n"


class LineSplitter:
    """Cuts a byte stream into whole lines, keeping a partial last line for the next read."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, data: bytes) -> bytes:
        """The complete lines (each ending in ``\\n``) that ``data`` finishes; may be empty."""
        if self._tail:
            data = self._tail + data
        end = data.rfind(b"\n") + 1
        if end == len(data):
            self._tail = b""
            return data
        self._tail = data[end:]
        return data[:end]

    def reset(self) -> None:
        """Forget a partial line (the connection it came from is gone)."""
        self._tail = b""


def only_replies(chunk: bytes, word: bytes) -> int:
    """How many lines ``chunk`` holds if every one starts with ``word + b" "``, else 0.

    The fast path for pipelined publishes: two C-level counts answer for a whole
    read, instead of a Python step per reply.
    """
    lines = chunk.count(b"\n")
    prefix = word + b" "
    if chunk.startswith(prefix) and chunk.count(b"\n" + prefix) == lines - 1:
        return lines
    return 0


def parse_delivery(line: bytes) -> tuple[bytes, bytes] | None:
    """``(topic, data)`` of a ``MESSAGE <topic> <data>`` line, or None when the line is not one."""
    if not line.startswith(b"MESSAGE "):
        return None
    end = line.find(b" ", 8)
    if end < 0:
        return None
    return line[8:end], line[end + 1 :]


def parse_reply(line: bytes) -> tuple[bytes, bytes]:
    """``(word, rest)`` of a reply line such as ``PUBLISHED <topic>`` or ``ERROR <reason>``."""
    word, _, rest = line.partition(b" ")
    return word, rest
