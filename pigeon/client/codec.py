"""The client's half of the wire protocol: checks and encodes commands, splits and parses reply lines.

Shared by ``Client`` and ``AsyncClient``. Work is done on whole buffers with
``bytes`` methods (``find``, ``split``, ``count``, ``%``), which run in C: no
Python loop ever walks a line byte by byte.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator, Sequence
from itertools import repeat
from typing import Any, Protocol, cast

from pigeon.errors import CommandError, InvalidArgumentError
from pigeon.protocol import topic_problem

CHUNK = 2048  # PUBLISH lines per buffer that publish_many sends at once

Bytes = bytes | bytearray | memoryview
_BYTES_LIKE = {bytes, bytearray, memoryview}
Data = Bytes | str


class Settler(Protocol):
    """What settles acknowledged deliveries: the client they came from."""

    def ack(self, messages: Iterable[Message]) -> None:
        """Acknowledge ``messages``."""

    def nack(self, messages: Iterable[Message], delay: float | None = None) -> None:
        """Give ``messages`` back for redelivery."""


class Replier(Protocol):
    """What answers a request: the client it came to."""

    def reply(self, token: bytes, data: Data) -> None:
        """Send ``data`` as the reply to the request whose reply token is ``token``."""


class Link:
    """One connection of a client, as the deliveries of its acknowledged subscriptions know it.

    A delivery tag means something only on the connection that issued it, so
    each message keeps the ``Link`` it came on, and the client settles only
    the messages of its current one.
    """

    __slots__ = ("client",)

    def __init__(self, client: Settler) -> None:
        self.client = client


class Message:
    """One delivery: the topic it was published to and its bytes.

    From an acknowledged subscription it also has its delivery ``tag`` and
    ``attempt`` (1 on the first delivery), and ``ack()`` and ``nack()``
    settle it; from a plain one both are None. A request (``client.request``)
    has its ``reply_to`` token, and ``respond()`` answers it. Read-only; equal
    when topic, data, tag and attempt are; unpacks as ``topic, data``.
    """

    __slots__ = ("_attempt", "_data", "_link", "_replier", "_reply_to", "_tag", "_topic")

    def __init__(
        self,
        topic: str,
        data: bytes,
        tag: int | None = None,
        attempt: int | None = None,
        link: Link | None = None,
        reply_to: bytes | None = None,
        replier: Replier | None = None,
    ) -> None:
        self._topic = topic
        self._data = data
        self._tag = tag
        self._attempt = attempt
        self._link = link
        self._reply_to = reply_to
        self._replier = replier

    @property
    def topic(self) -> str:
        """The topic it was published to."""
        return self._topic

    @property
    def data(self) -> bytes:
        """The message's bytes."""
        return self._data

    @property
    def tag(self) -> int | None:
        """Its delivery tag on the connection it came on; None from a plain subscription."""
        return self._tag

    @property
    def attempt(self) -> int | None:
        """Which delivery of the message this is (1: the first); None from a plain subscription."""
        return self._attempt

    @property
    def reply_to(self) -> str | None:
        """The reply token of a request (``<handle>.<generation>.<id>``); None for a plain message."""
        return None if self._reply_to is None else self._reply_to.decode()

    @property
    def text(self) -> str:
        """The data decoded as UTF-8."""
        return self._data.decode()

    def ack(self) -> None:
        """Acknowledge this message (``client.ack([message])``): the broker forgets it."""
        self._settler().ack((self,))

    def nack(self, delay: float | None = None) -> None:
        """Give this message back for redelivery, after ``delay`` seconds if given (``client.nack``)."""
        self._settler().nack((self,), delay)

    def respond(self, data: Data) -> None:
        """Answer this request: ``data`` goes straight back to its requester (the first answer of
        any responder wins; later ones are dropped by the broker). Sent at once, without waiting:
        the broker does not reply to a ``REPLY``. InvalidArgumentError when this is no request."""
        if self._reply_to is None or self._replier is None:
            raise InvalidArgumentError("not a request: there is no one to respond to")
        self._replier.reply(self._reply_to, data)

    def _settler(self) -> Settler:
        if self._link is None:
            raise InvalidArgumentError("a message of a plain subscription: there is nothing to settle")
        return self._link.client

    def _key(self) -> tuple[str, bytes, int | None, int | None]:
        return self._topic, self._data, self._tag, self._attempt

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Message) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __iter__(self) -> Iterator[str | bytes]:
        return iter((self._topic, self._data))

    def __repr__(self) -> str:
        settle = f", tag={self._tag}, attempt={self._attempt}" if self._tag is not None else ""
        return f"Message(topic={self._topic!r}, data={self._data!r}{settle})"


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
    # checking here gives the error before anything is sent
    problem = topic_problem(text)
    if problem is not None:
        raise InvalidArgumentError(problem)
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


def payload_bytes(message: Data) -> bytes:
    """Any message as the bytes a framed ``PUB`` carries as they are (str is encoded as UTF-8)."""
    return message if type(message) is bytes else _as_bytes(message)


def framed_payloads(messages: Iterable[Data], max_payload: int | None) -> list[Bytes]:
    """Many messages as framed payloads, every one checked; raises InvalidArgumentError naming the
    first that cannot be sent (not bytes or str, or over ``max_payload``).

    A list of bytes-like messages is used as it is, checked by C-level passes
    (their types, their longest length) with no Python step per message.
    """
    items = messages if isinstance(messages, list) else list(messages)
    if set(map(type, items)) <= _BYTES_LIKE:
        payloads = cast("list[Bytes]", items)
    else:
        payloads = [_message_bytes(message, index) for index, message in enumerate(items)]
    if max_payload is not None and payloads and max(map(len, payloads)) > max_payload:
        index = next(i for i, data in enumerate(payloads) if len(data) > max_payload)
        try:
            check_payload(payloads[index], max_payload)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"message {index}: {exc}") from None
    return payloads


def check_payload(data: Bytes, max_payload: int | None) -> None:
    """Raise InvalidArgumentError for a payload over the server's ``max_payload`` (when its HELLO said)."""
    if max_payload is not None and len(data) > max_payload:
        raise InvalidArgumentError(
            f"the payload is {len(data)} bytes, over the server's limit of {max_payload} (max_payload)"
        )


def pub_frame(client_id: bytes, topic: bytes, data: bytes) -> bytes:
    """The framed publish of protocol 2: ``PUB <client_id> <topic> <nbytes>``, the payload, a line end."""
    return b"PUB %s %s %d\n%s\n" % (client_id, topic, len(data), data)


def req_frame(client_id: bytes, topic: bytes, data: bytes) -> bytes:
    """A request: ``REQ <client_id> <topic> <nbytes>``, the payload, a line end (``REQUESTED <id>``)."""
    return b"REQ %s %s %d\n%s\n" % (client_id, topic, len(data), data)


def reply_frame(token: bytes, data: bytes) -> bytes:
    """The answer to a request: ``REPLY <token> <nbytes>``, the payload, a line end (no answer)."""
    return b"REPLY %s %d\n%s\n" % (token, len(data), data)


def pub_frames(client_id: bytes, topic: bytes, messages: Sequence[Bytes]) -> bytes:
    """Framed publishes of many payloads on one topic, as one buffer, with no Python step per
    message: payloads of one length (the usual batch) are joined with the header between them, as
    ``publish_chunk`` joins lines; others go through one join over C-level maps."""
    lengths = set(map(len, messages))
    if len(lengths) == 1:
        head = b"PUB %s %s %d\n" % (client_id, topic, lengths.pop())
        return head + (b"\n" + head).join(messages) + b"\n"
    head = b"PUB %s %s " % (client_id, topic)
    return b"".join(map(b"%s%d\n%s\n".__mod__, zip(repeat(head), map(len, messages), messages)))


def _as_bytes(message: Data) -> bytes:
    if isinstance(message, str):
        return message.encode()
    if isinstance(message, (bytearray, memoryview)):
        return bytes(message)
    if isinstance(message, bytes):  # a bytes subclass
        return bytes(message)
    raise InvalidArgumentError(f"message must be bytes or str, not {type(message).__name__}")


def connect_line(user: str | None = None, password: str | None = None) -> bytes:
    """The CONNECT command, with the credentials when given (each one word: ``address.check_credentials``)."""
    if user is None or password is None:
        return b"CONNECT\n"
    return f"CONNECT {user} {password}\n".encode()


PREFETCH_MAX = 1_000_000  # the most unacknowledged messages a subscription may hold
NACK_DELAY_MAX = 86_400.0  # seconds: the longest delay of a NACK (the server's 86,400,000 ms)


GROUP_NAME_MAX = 64  # bytes of a consumer group's name


@dataclasses.dataclass(frozen=True, slots=True)
class SubscribeOptions:
    """How to subscribe: plainly, or with acknowledgements and an optional prefetch window; in a
    consumer group (its encoded name) or the default one (None)."""

    ack: bool = False
    prefetch: int | None = None
    group: bytes | None = None

    def __post_init__(self) -> None:
        if self.prefetch is None:
            return
        if not self.ack:
            raise InvalidArgumentError("prefetch needs ack=True (a plain subscription has no window)")
        if type(self.prefetch) is not int or not 1 <= self.prefetch <= PREFETCH_MAX:
            raise InvalidArgumentError(f"prefetch must be 1 to {PREFETCH_MAX:,}, not {self.prefetch!r}")


PLAIN = SubscribeOptions()


def encode_group(group: str | bytes) -> bytes:
    """A consumer group's name as wire bytes: a valid topic name of at most 64 bytes; raises
    InvalidArgumentError for one the server would refuse."""
    raw = encode_topic(group)
    if len(raw) > GROUP_NAME_MAX:
        raise InvalidArgumentError(f"group name must be at most {GROUP_NAME_MAX} bytes, not {len(raw)}")
    return raw


def _group_suffix(group: bytes | None) -> bytes:
    return b"" if group is None else b" GROUP " + group


def subscribe_line(client_id: bytes, topic: bytes, options: SubscribeOptions = PLAIN) -> bytes:
    """SUBSCRIBE for an encoded topic or pattern, with ``GROUP <name>``, ``ACK`` and ``PREFETCH <n>``
    as ``options`` say."""
    head = b"SUBSCRIBE %s %s%s" % (client_id, topic, _group_suffix(options.group))
    if not options.ack:
        return head + b"\n"
    if options.prefetch is None:
        return head + b" ACK\n"
    return head + b" ACK PREFETCH %d\n" % options.prefetch


def destroy_line(client_id: bytes, topic: bytes, group: bytes) -> bytes:
    """DESTROY of the consumer group (encoded topic or pattern, encoded name)."""
    return b"DESTROY %s %s GROUP %s\n" % (client_id, topic, group)


def is_pattern(name: bytes) -> bool:
    """Whether a subscription name is a wildcard pattern: it has a ``*`` or ``>`` token."""
    return any(token in (b"*", b">") for token in name.split(b"."))


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether a subscription to ``pattern`` gets messages of ``topic`` (the NATS rules of the
    server: ``*`` one non-empty token, ``>`` as the last token one or more tokens)."""
    want, have = pattern.split("."), topic.split(".")
    if want[-1] == ">":
        head = want[:-1]
        return len(have) > len(head) and _tokens_match(head, have) and bool(".".join(have[len(head) :]))
    return len(want) == len(have) and _tokens_match(want, have)


def _tokens_match(want: list[str], have: list[str]) -> bool:
    return all(w == h or (w == "*" and h) for w, h in zip(want, have, strict=False))


def settle_lines(verb: bytes, client_id: bytes, tags: list[int], suffix: bytes = b"") -> bytes:
    """``ACK`` or ``NACK`` lines for ``tags``: one ``<first>-<last>`` range per run of consecutive tags.

    A range settles every outstanding tag inside it, so only runs with no
    gap become ranges; ``suffix`` (a NACK's `` <delay_ms>``) ends every line.
    """
    tags = sorted(set(tags))
    first = tags[0]
    if tags[-1] - first == len(tags) - 1:  # one run: the usual batch of a consumer
        runs = [(first, tags[-1])]
    else:
        runs = []
        last = first
        for tag in tags[1:]:
            if tag != last + 1:
                runs.append((first, last))
                first = tag
            last = tag
        runs.append((first, last))
    head = verb + b" " + client_id + b" "
    return b"".join(
        head + (b"%d" % low if low == high else b"%d-%d" % (low, high)) + suffix + b"\n" for low, high in runs
    )


def nack_suffix(delay: float | None) -> bytes:
    """The `` <delay_ms>`` that ends a NACK line for ``delay`` seconds (b"" for none)."""
    if delay is None:
        return b""
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay <= NACK_DELAY_MAX:
        raise InvalidArgumentError(f"delay must be 0 to {NACK_DELAY_MAX:,.0f} seconds, not {delay!r}")
    return b" %d" % round(delay * 1000)


def unsubscribe_line(client_id: bytes, topic: bytes, group: bytes | None = None) -> bytes:
    """UNSUBSCRIBE for an encoded topic or pattern, from a group when ``group`` names one."""
    return b"UNSUBSCRIBE %s %s%s\n" % (client_id, topic, _group_suffix(group))


def publish_line(client_id: bytes, topic: bytes, data: bytes, max_line: int | None = None) -> bytes:
    """PUBLISH for an encoded topic and message; raises InvalidArgumentError for a line over ``max_line``."""
    line = b"PUBLISH %s %s %s\n" % (client_id, topic, data)
    if max_line is not None and len(line) - 1 > max_line:
        raise InvalidArgumentError(_too_long(len(line) - 1, max_line))
    return line


def checked_messages(
    client_id: bytes, topic: bytes, messages: Iterable[Data], max_line: int | None = None
) -> list[Bytes]:
    """Many messages for PUBLISH commands on one topic, every one checked; raises InvalidArgumentError
    naming the first that cannot be sent.

    A list of bytes-like messages is used as it is. The checks run in C over
    each CHUNK of messages joined (two ``memchr`` scans and a length), so they
    cost no Python step per message; only a chunk with a ``\\r`` somewhere, or
    longer than a line may be, gets a closer look.
    """
    items = messages if isinstance(messages, list) else list(messages)
    head = len(b"PUBLISH %s %s " % (client_id, topic))
    longest = None if max_line is None else max_line - head  # the longest message that fits
    start = 0
    while start < len(items):
        part = cast("list[Bytes]", items[start : start + CHUNK])
        try:
            joined = b"".join(part)
        except TypeError:  # not all bytes-like: convert them all, or name the first that is neither
            items = [_message_bytes(message, index) for index, message in enumerate(items)]
            continue
        too_long = longest is not None and len(joined) > longest and max(map(len, part)) > longest
        if b"\n" in joined or b"\r" in joined or too_long:
            _refuse_first(part, start, head, max_line)
        start += CHUNK
    return cast("list[Bytes]", items)


def publish_chunk(client_id: bytes, topic: bytes, messages: list[Bytes]) -> bytes:
    """PUBLISH commands for many checked messages on one topic, as one buffer built by one join."""
    head = b"PUBLISH %s %s " % (client_id, topic)
    return head + (b"\n" + head).join(messages) + b"\n"


def _message_bytes(message: Data, index: int) -> Bytes:
    if isinstance(message, (bytes, bytearray, memoryview)):
        return message
    try:
        return _as_bytes(message)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"message {index}: {exc}") from None


def _refuse_first(part: list[Bytes], start: int, head: int, max_line: int | None) -> None:
    """Raise the error of the first message of ``part`` that cannot be sent (``start``: its index)."""
    for index, message in enumerate(part, start):
        try:
            encode_message(message)
            if max_line is not None and head + len(message) > max_line:
                raise InvalidArgumentError(_too_long(head + len(message), max_line))
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"message {index}: {exc}") from None


def _too_long(length: int, max_line: int) -> str:
    return f"the PUBLISH line would be {length} bytes, over the server's limit of {max_line} (max_line)"


def ping_line() -> bytes:
    """The PING command."""
    return b"PING\n"


def disconnect_line() -> bytes:
    """The DISCONNECT command."""
    return b"DISCONNECT\n"


def hello_line(protocol: int = 1) -> bytes:
    """The HELLO command, which asks the server for its protocol version and limits; ``HELLO 2`` also
    switches the connection to protocol 2 (deliveries as MSG and DMSG frames)."""
    return b"HELLO\n" if protocol == 1 else b"HELLO %d\n" % protocol


STATS_PAGE = 1000  # the most entries the server puts in one page of STATS TOPICS or CONNECTIONS
STATS_SECTIONS = ("topics", "connections", "groups")


def stats_line(section: str | None = None, cursor: int = 0) -> bytes:
    """STATS (server-wide figures), or the page of a section's listing that starts at ``cursor``."""
    if section is None:
        return b"STATS\n"
    return b"STATS %s %d %d\n" % (section.upper().encode(), cursor, STATS_PAGE)


@dataclasses.dataclass(frozen=True, slots=True)
class ServerInfo:
    """What the server's HELLO reply says: its protocol version and the limits a client must respect."""

    protocol: int
    max_line: int  # the longest command line, without its newline
    topic_max: int
    idle_timeout: float  # seconds of silence after which the server closes a connection; 0: never
    features: tuple[str, ...]
    max_payload: int | None = None  # the largest framed payload; None from a server older than protocol 2


def parse_hello(reply: bytes) -> ServerInfo:
    """The ``ServerInfo`` in the JSON after ``HELLO``; raises ValueError for a reply that is not one."""
    try:
        info = json.loads(reply)
        return ServerInfo(
            protocol=int(info["protocol"]),
            max_line=int(info["max_line"]),
            topic_max=int(info["topic_max"]),
            idle_timeout=float(info["idle_timeout"]),
            features=tuple(str(feature) for feature in info["features"]),
            max_payload=int(info["max_payload"]) if "max_payload" in info else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"bad HELLO reply: {reply[:200]!r}") from exc


def _json_object(verb: str, reply: bytes) -> dict[str, Any]:
    """The JSON object after ``verb``; raises ValueError for a reply that is not one."""
    document = json.loads(reply)
    if not isinstance(document, dict):
        raise ValueError(f"bad {verb} reply: {reply[:200]!r}")
    return document


def parse_stats(reply: bytes) -> dict[str, Any]:
    """The figures in the JSON after ``STATS``; raises ValueError for a reply that is not a JSON object."""
    return _json_object("STATS", reply)


def cluster_line() -> bytes:
    """CLUSTER STATUS: the cluster as the node sees it (docs/cluster.md)."""
    return b"CLUSTER STATUS\n"


def redirect_line() -> bytes:
    """CLUSTER REDIRECT: a cluster node answers ``ERROR MOVED`` for other nodes' topics, not forwarding."""
    return b"CLUSTER REDIRECT\n"


def parse_cluster(reply: bytes) -> dict[str, Any]:
    """The JSON after ``CLUSTER``; raises ValueError for a reply that is not a JSON object."""
    return _json_object("CLUSTER", reply)


def parse_stats_page(section: str, reply: bytes) -> tuple[list[dict[str, Any]], int]:
    """The entries of a page of ``STATS TOPICS`` or ``CONNECTIONS``, and the next page's cursor (0: none)."""
    page = parse_stats(reply)
    try:
        return list(page[section]), int(page["next"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"bad STATS {section.upper()} reply: {reply[:200]!r}") from exc


HEADERS_KEPT = 256  # parsed MSG headers a FrameSplitter keeps
# A delivery of protocol 2: (topic, payload, tag, attempt, reply token), tag and attempt None for
# ``MSG``, the token None but for a request; a reply to a request of this client (``RMSG``) has an
# empty topic (no topic is empty) and its request id as tag. A plain tuple: a client reads
# hundreds of thousands a second, and a tuple costs least to make.
Frame = tuple[bytes, bytes, int | None, int | None, bytes | None]
Header = tuple[bytes, int | None, int | None, bytes | None, int]


class BadStream(ValueError):
    """The server's output cannot be cut into lines and frames (a frame header that is not one)."""


def _frame_start(buf: bytes, pos: int) -> int:
    """Where the first line after ``pos`` starting with ``MSG ``, ``DMSG `` or ``RMSG `` starts, else -1."""
    at = pos + 1
    while True:
        found = buf.find(b"MSG ", at)
        if found < 0:
            return -1
        # 0x44, 0x52: the D of DMSG, the R of RMSG
        start = found - 1 if buf[found - 1] in (0x44, 0x52) else found
        if buf[start - 1] == 0x0A:
            return start
        at = found + 1


def _frame_header(header: bytes) -> Header:
    """``(topic, tag, attempt, reply token, nbytes)`` of a ``MSG``, ``DMSG`` or ``RMSG`` header
    line (an RMSG's: an empty topic, its request id as tag); raises BadStream."""
    fields = header.split(b" ")
    try:
        if fields[0] == b"MSG" and len(fields) in (3, 4):
            return fields[1], None, None, fields[2] if len(fields) == 4 else None, int(fields[-1])
        if fields[0] == b"DMSG" and len(fields) in (5, 6):
            token = fields[4] if len(fields) == 6 else None
            return fields[1], int(fields[2]), int(fields[3]), token, int(fields[-1])
        if fields[0] == b"RMSG" and len(fields) == 3:
            return b"", int(fields[1]), None, None, int(fields[2])
    except ValueError:
        pass
    raise BadStream(f"bad frame header from the server: {header[:100]!r}")


class FrameSplitter:
    """Cuts the server's output into runs of whole text lines and the frames (MSG, DMSG) between them,
    keeping an unfinished line or frame for the next read.

    A frame's payload is taken by its length, never looked into; while one is
    incomplete the reads are only collected, and joined once it is all there.
    """

    __slots__ = ("_headers", "_held", "_need", "_parts")

    def __init__(self) -> None:
        # MSG headers seen lately, parsed: a stream repeats a few (one topic, one size) many times
        self._headers: dict[bytes, Header] = {}
        self._parts: list[bytes] = []  # input not yet cut, in order
        self._held = 0  # its length
        self._need = 0  # bytes the unfinished frame needs in all before cutting is worth trying

    def feed(self, data: bytes) -> list[bytes | Frame]:
        """The runs of complete lines (each run ending in ``\\n``) and the frames that ``data`` finishes."""
        if self._parts:
            self._parts.append(data)
            self._held += len(data)
            if self._held < self._need:
                return []
            buf = b"".join(self._parts)
            self._parts = []
        else:
            buf = data
        self._need = 0
        out: list[bytes | Frame] = []
        pos = 0
        size = len(buf)
        starts, find, headers = buf.startswith, buf.find, self._headers
        while pos < size:
            if starts(b"MSG ", pos) or starts(b"DMSG ", pos) or starts(b"RMSG ", pos):
                eol = find(b"\n", pos)
                if eol < 0:
                    break
                header = buf[pos:eol]
                parsed = headers.get(header)
                if parsed is None:
                    parsed = _frame_header(header)
                    if parsed[1] is None and parsed[3] is None:  # a tag or token is its own: not kept
                        if len(headers) >= HEADERS_KEPT:
                            headers.clear()
                        headers[header] = parsed
                topic, tag, attempt, token, nbytes = parsed
                end = eol + 1 + nbytes
                if end >= size:
                    self._need = end + 1 - pos
                    break
                if buf[end] != 0x0A:
                    raise BadStream(
                        f"a frame of {nbytes} bytes from the server is not followed by a line end"
                    )
                out.append((topic, buf[eol + 1 : end], tag, attempt, token))
                pos = end + 1
                continue
            start = _frame_start(buf, pos)
            lines_end = start if start >= 0 else buf.rfind(b"\n", pos) + 1
            if lines_end <= pos:
                break  # an unfinished line
            out.append(buf[pos:lines_end])
            pos = lines_end
        if pos < size:
            self._parts = [buf[pos:]]
            self._held = size - pos
        return out

    def reset(self) -> None:
        """Forget an unfinished line or frame (the connection it came from is gone)."""
        self._parts = []
        self._held = self._need = 0


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


def parse_acked_delivery(line: bytes) -> tuple[bytes, int, int, bytes] | None:
    """``(topic, tag, attempt, data)`` of a ``DELIVER <topic> <tag> <attempt> <data>`` line, else None."""
    if not line.startswith(b"DELIVER "):
        return None
    fields = line.split(b" ", 4)
    if len(fields) != 5:
        return None
    try:
        return fields[1], int(fields[2]), int(fields[3]), fields[4]
    except ValueError:
        return None


def parse_reply(line: bytes) -> tuple[bytes, bytes]:
    """``(word, rest)`` of a reply line such as ``PUBLISHED <topic>`` or ``ERROR <reason>``."""
    word, _, rest = line.partition(b" ")
    return word, rest
