"""The client's protocol state, without I/O: which replies are awaited, and the deliveries received.

The server answers every command with exactly one line, in order, and may put
deliveries anywhere in between: ``MSG`` and ``DMSG`` frames after ``HELLO 2``
(the client's), ``MESSAGE`` and ``DELIVER`` lines from a server older than it. So replies are matched
to commands first in, first out, and deliveries are set aside for the consumer: a
delivery that arrives while a reply is awaited is never lost and never taken for
the reply. ``ACK`` and ``NACK`` have no reply on success; their one error,
``UNKNOWN_DELIVERY_TAG``, is told apart by its code and set aside too; so does
``REPLY`` (``BAD_REPLY_TOKEN``). A request's ``REQUESTED <id>`` reply makes the
id awaited, and the reply to it (an ``RMSG`` frame, which always comes after)
is kept in ``replies`` for ``request()``; one for an id not awaited is dropped.

``Client`` and ``AsyncClient`` wrap one ``Session`` each and do the socket work.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import cast

from pigeon.client import codec
from pigeon.client.codec import Link, Message, Refused, Replier
from pigeon.errors import (
    BadReplyTokenError,
    ClosingError,
    CommandError,
    ConnectionClosedError,
    PigeonError,
    UnknownDeliveryTagError,
    error_from_reply,
)

UNKNOWN_TAGS_KEPT = 1000  # refused ACK/NACK lines kept for check_acks(); older ones are dropped


class Pending:
    """The replies awaited for one command, or for a run of pipelined publishes (a batch)."""

    __slots__ = ("answered", "batch", "error", "refused", "reply", "total", "unwaited", "verb", "waiter")

    def __init__(self, verb: bytes, *, batch: bool = False, unwaited: bool = False) -> None:
        self.verb = verb  # the reply word that means success
        self.batch = batch
        self.unwaited = unwaited  # a batch of ``publish(wait=False)`` calls that later ones may extend
        self.total = 0
        self.answered = 0
        self.reply = b""  # what followed the verb in a single command's reply
        self.error: PigeonError | None = None  # why a single command failed
        self.refused: list[Refused] = []  # a batch's failures, by index in the batch
        self.waiter: object = None  # the async client's future, resolved when done

    @property
    def done(self) -> bool:
        """Every reply has arrived (or the connection was lost)."""
        return self.answered >= self.total


class Session:
    """Matches replies to commands and queues deliveries for one connection at a time."""

    __slots__ = (
        "_lines",
        "_pending",
        "_topic_names",
        "awaited",
        "bad_replies",
        "broken",
        "closing",
        "in_flight",
        "link",
        "messages",
        "notice",
        "replier",
        "replies",
        "unknown_tags",
    )

    def __init__(self, replier: Replier | None = None) -> None:
        self._lines = codec.FrameSplitter()
        self._pending: deque[Pending] = deque()
        self._topic_names: dict[bytes, str] = {}
        self.in_flight = 0  # replies still to come
        self.messages: deque[Message] = deque()
        self.notice: CommandError | None = None  # an ERROR the server sent unasked, or before closing
        self.closing = False  # the server sent an error after which it closes the connection
        self.broken: str | None = None  # why the server's output stopped making sense
        self.link: Link | None = None  # the open connection, as its acknowledged deliveries know it
        self.unknown_tags: deque[UnknownDeliveryTagError] = deque(maxlen=UNKNOWN_TAGS_KEPT)
        self.bad_replies: deque[BadReplyTokenError] = deque(maxlen=UNKNOWN_TAGS_KEPT)
        self.replier = replier  # what answers the requests delivered here (the client)
        self.awaited: set[int] = set()  # ids of this connection's requests that await a reply
        self.replies: dict[int, bytes] = {}  # replies arrived for them, by request id

    def expect(self, verb: bytes) -> Pending:
        """Register one command just sent; its reply word on success is ``verb``."""
        pending = Pending(verb)
        pending.total = 1
        self._pending.append(pending)
        self.in_flight += 1
        return pending

    def expect_batch(self, count: int) -> Pending:
        """Register ``count`` pipelined PUBLISH commands just sent, as one batch."""
        pending = Pending(b"PUBLISHED", batch=True)
        pending.total = count
        self._pending.append(pending)
        self.in_flight += count
        return pending

    def expect_unwaited(self) -> Pending:
        """Register one ``publish(wait=False)``, extending the last batch of them while it is awaited."""
        last = self._pending[-1] if self._pending else None
        if last is None or not last.unwaited:
            last = Pending(b"PUBLISHED", batch=True, unwaited=True)
            self._pending.append(last)
        last.total += 1
        self.in_flight += 1
        return last

    def cut_batch(self, batch: Pending, sent: int, error: PigeonError) -> list[Refused]:
        """Give up on a batch of which only the first ``sent`` lines were sent.

        Replies are still awaited for the sent lines (late ones are matched
        and dropped), no longer for the others. Returns the batch's refusals
        so far, then every message without a reply, refused with ``error``.
        """
        total = batch.total
        refused = [*batch.refused, *(Refused(index, error) for index in range(batch.answered, total))]
        if sent < total:
            self.in_flight -= total - sent
            batch.total = sent
            if batch.done and batch in self._pending:
                self._pending.remove(batch)
        return refused

    def receive(self, data: bytes) -> list[Pending]:
        """Take bytes read from the socket; returns the entries they completed.

        A line that is neither a delivery nor the reply expected next sets
        ``broken`` and stops the reading: the connection can no longer be trusted.
        An error after which the server closes the connection (a ``ClosingError``,
        asked for or not) sets ``closing`` and stops the reading too.
        """
        try:
            parts = self._lines.feed(data)
        except codec.BadStream as exc:
            self.broken = str(exc)
            return []
        completed: list[Pending] = []
        messages, link = self.messages, self.link
        for part in parts:
            if type(part) is tuple:
                topic, data, tag, attempt, token = part
                if not topic:  # RMSG: the reply to one of this connection's requests
                    if tag in self.awaited:
                        self.awaited.discard(tag)
                        self.replies[tag] = data
                    continue
                messages.append(
                    Message(
                        self._topic_name(topic),
                        data,
                        tag,
                        attempt,
                        None if tag is None else link,
                        token,
                        None if token is None else self.replier,
                    )
                )
            elif not self._receive_lines(cast(bytes, part), completed):
                break
        return completed

    def _receive_lines(self, chunk: bytes, completed: list[Pending]) -> bool:
        """Take a run of whole text lines; False when reading must stop (see ``receive``)."""
        pending = self._pending
        if pending and pending[0].batch:
            head = pending[0]
            count = codec.only_replies(chunk, head.verb)
            if count and count <= head.total - head.answered:
                head.answered += count
                self.in_flight -= count
                if head.done:
                    pending.popleft()
                    completed.append(head)
                return True
        lines = chunk.split(b"\n")
        lines.pop()  # the empty string after the last newline
        for line in lines:
            delivery = codec.parse_delivery(line)
            if delivery is not None:
                self._on_delivery(*delivery)
                continue
            acked = codec.parse_acked_delivery(line)
            if acked is not None:
                topic, tag, attempt, data = acked
                self.messages.append(Message(self._topic_name(topic), data, tag, attempt, self.link))
            elif not self._on_reply(line, completed):
                return False
        return True

    def lost(
        self, reason: str, error_type: type[ConnectionClosedError] = ConnectionClosedError
    ) -> tuple[list[Pending], ConnectionClosedError]:
        """The connection is gone: fail everything still awaited.

        Returns the failed entries and the error that says why, with the
        server's last unasked ERROR as its ``error``. The session is then
        ready for a new connection; received deliveries stay queued.
        """
        error = error_type(reason, self.notice)
        failed = list(self._pending)
        for entry in failed:
            if entry.batch:
                # the reply never came: the server may or may not have taken the message
                entry.refused.extend(Refused(i, error) for i in range(entry.answered, entry.total))
            else:
                entry.error = error
            entry.answered = entry.total
        self._pending.clear()
        self._lines.reset()
        self.in_flight = 0
        self.awaited.clear()  # replies are sent to the connection that asked: none will come now
        self.notice = None
        self.closing = False
        self.broken = None
        self.drop_acked(lambda message: True)
        self.link = None
        return failed, error

    def drop_acked(self, which: Callable[[Message], bool]) -> None:
        """Forget the queued deliveries of the current connection's acknowledged subscriptions that
        ``which`` picks (the server has given them back)."""
        link = self.link
        if link is None or not any(message._link is link for message in self.messages):
            return
        kept = [message for message in self.messages if message._link is not link or not which(message)]
        self.messages.clear()
        self.messages.extend(kept)

    def take_unknown_tags(self) -> list[UnknownDeliveryTagError]:
        """The ``UNKNOWN_DELIVERY_TAG`` errors received since the last call, oldest first."""
        refused = list(self.unknown_tags)
        self.unknown_tags.clear()
        return refused

    def _on_delivery(self, topic: bytes, data: bytes) -> None:
        self.messages.append(Message(self._topic_name(topic), data))

    def _topic_name(self, topic: bytes) -> str:
        name = self._topic_names.get(topic)
        if name is None:
            name = self._topic_names[topic] = topic.decode("utf-8", "replace")
        return name

    def _on_reply(self, line: bytes, completed: list[Pending]) -> bool:
        """Match a reply to the oldest awaited command; False when reading must stop.

        Reading stops at a line that makes no sense here, and at an error
        after which the server closes the connection.
        """
        word, rest = codec.parse_reply(line)
        error = error_from_reply(rest.decode("utf-8", "replace")) if word == b"ERROR" else None
        if isinstance(error, UnknownDeliveryTagError):
            self.unknown_tags.append(error)  # an ACK or NACK refused: no command awaits it
            return True
        if isinstance(error, BadReplyTokenError):
            self.bad_replies.append(error)  # a REPLY refused: no command awaits it either
            return True
        if isinstance(error, ClosingError):
            # the connection ends here: what is awaited fails with this error as the reason
            self.notice = error
            self.closing = True
            return False
        if not self._pending:
            if error is not None:
                self.notice = error
                return True
            self.broken = f"unexpected line from the server: {line[:100]!r}"
            return False
        head = self._pending[0]
        if word == head.verb:
            head.reply = rest
            if word == b"REQUESTED" and rest.isdigit():
                self.awaited.add(int(rest))  # before its RMSG can be read
        elif error is not None:
            if head.batch:
                head.refused.append(Refused(head.answered, error))
            else:
                head.error = error
        else:
            self.broken = f"expected {head.verb.decode()} or ERROR from the server, got {line[:100]!r}"
            return False
        head.answered += 1
        self.in_flight -= 1
        if head.done:
            self._pending.popleft()
            completed.append(head)
        return True
