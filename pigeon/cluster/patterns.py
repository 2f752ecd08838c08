"""Wildcard patterns on a cluster node: a client's pattern subscriptions are placed on every live node.

A pattern (``orders.*``, ``orders.>``) matches topics of every slot, so of every owner. As NATS
routes propagate a subscription's interest to every server of the cluster, a node places each
pattern ``SUBSCRIBE`` of a client on its own core and, over the client's upstream connections
(``pigeon.cluster.router``), on every other live member: each owner then sees the client as a
subscriber of its own for the topics it owns that match, so each message goes to one member of
each group, round robin, with acks and redelivery, by the owner that holds it (docs/cluster.md,
"Wildcard patterns").

A client's pattern command is sent to the other nodes first, their answers are taken here (not
relayed), and then the client gets one answer:

- ``SUBSCRIBE``: when every node accepted, the command runs in this node's core, whose answer is
  the client's (once that core runs input at once: not while the connection is paused or its
  publish waits for flow control, so that whether it subscribed is known right after); when this
  core refused it, the other nodes drop it again; when another node refused, the client gets the
  first refusal as that node gave it, the nodes that accepted a new subscription drop it again, and
  this node's core never sees it;
- ``UNSUBSCRIBE``: this node's core answers, once every other node has dropped it;
- ``DESTROY``: the first refusal other than ``NO_SUCH_GROUP``; else ``DESTROYED`` when some node
  destroyed the group (answered here when this node's core holds none); else this node's core
  answers (``NO_SUCH_GROUP``).

A node that is not reachable counts as having answered nothing. The subscriptions made are kept,
and placed on each member that lacks them whenever the member set is read again (a node that
joins, or one whose link broke): ``place``.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import TYPE_CHECKING

from pigeon.cluster._scan import command_fields

if TYPE_CHECKING:
    from pigeon.cluster.router import RoutedConnection

log = logging.getLogger("pigeon.cluster")

# The source name of a pattern command in the router: every node (no node name has a control
# character: argv cannot hold a NUL, and names are checked at start)
EVERY_NODE = "\1"

# Seconds before a node whose link to a client's patterns broke is tried again (also done at
# every read of the member set, at least once a second)
PLACE_AGAIN = 1.0

Key = tuple[bytes, bytes | None]  # (pattern, group name or None)


def subscription_key(rest: bytes) -> Key:
    """(pattern, group) of a pattern command's fields after the client id."""
    fields = command_fields(rest)
    group = fields[2] if len(fields) > 2 and fields[1].upper() == b"GROUP" else None
    return fields[0], group


class PatternPlacement:
    """The pattern subscriptions of one client connection of a node, and the nodes they are on."""

    __slots__ = ("_answers", "_command", "_conn", "_placed", "_starting", "_waiting", "subscriptions")

    def __init__(self, conn: RoutedConnection) -> None:
        self._conn = conn
        self.subscriptions: dict[Key, bytes] = {}  # the SUBSCRIBE fields after the client id, by key
        self._placed: dict[str, set[Key]] = {}  # node -> keys sent there (accepted, or not answered yet)
        self._command: tuple[bytes, bytes, bytes] | None = None  # (verb, rest, line) being answered
        self._answers: list[bytes] = []  # the other nodes' answers to it
        self._waiting: set[str] = set()  # the nodes it still waits for
        self._starting = False

    @property
    def busy(self) -> bool:
        """Whether a pattern command of the client waits for the other nodes' answers."""
        return self._command is not None

    def start(self, verb: bytes, rest: bytes, line: bytes) -> None:
        """Send the client's pattern command (``line``) to every other live node; ``_finish``
        answers it once they all have."""
        key = subscription_key(rest)
        if verb == b"UNSUBSCRIBE":
            # forgotten now, not once every node answered: a read of the member set meanwhile
            # (``place``) would send it again behind the UNSUBSCRIBE to a node slow to answer
            self.subscriptions.pop(key, None)
        nodes = self._conn.remote_members()
        self._command, self._answers, self._waiting = (verb, rest, line), [], set(nodes)
        self._starting = True
        for node in nodes:
            placed = self._placed.setdefault(node, set())
            if verb == b"SUBSCRIBE":
                placed.add(key)
            elif verb == b"UNSUBSCRIBE":
                placed.discard(key)
            self._conn.upstream_to(node).capture(verb, rest, partial(self._answered, node))
        self._starting = False
        if not self._waiting:
            self._finish()

    def _answered(self, node: str, answer: bytes | None) -> None:
        if self._command is None or node not in self._waiting:
            return
        self._waiting.discard(node)
        if answer is None:
            log.info("node %s was lost before it answered a pattern command", node)
        else:
            self._answers.append(answer)
            if answer.startswith(b"ERROR ") and self._command[0] == b"SUBSCRIBE":
                self._placed.get(node, set()).discard(subscription_key(self._command[1]))
        if not self._waiting:
            self._finish()
            if not self._starting:
                self._conn.fan_out_done()

    def _finish(self) -> None:
        assert self._command is not None
        verb, rest, line = self._command
        refusals = [answer for answer in self._answers if answer.startswith(b"ERROR ")]
        if verb == b"SUBSCRIBE" and not refusals and not self._conn.core_takes_input():
            return  # its answer is looked at as soon as the core runs it: wait until it runs input at once
        self._command = None
        key = subscription_key(rest)
        if verb == b"SUBSCRIBE":
            if refusals:
                if key not in self.subscriptions:
                    self._unplace(key)
                self._conn.reply(refusals[0])
                return
            self.subscriptions[key] = rest
            self._conn.feed_core(line)
            if not self._conn.core_subscribed(*key):
                # this node's core refused it (a limit or users file of its own): the client holds
                # no part of a subscription it was refused
                del self.subscriptions[key]
                self._unplace(key)
            return
        if verb == b"DESTROY":
            refusals = [answer for answer in refusals if not answer.startswith(b"ERROR NO_SUCH_GROUP ")]
            if refusals:
                self._conn.reply(refusals[0])
                return
            pattern, group = key
            destroyed = any(answer.startswith(b"DESTROYED ") for answer in self._answers)
            if destroyed and group is not None and not self._conn.core_holds_group(pattern, group):
                self._conn.reply(b"DESTROYED %s %s" % (pattern, group))
                return
        self._conn.feed_core(line)

    def core_resumed(self) -> None:
        """This node's core runs the client's input at once again: a ``SUBSCRIBE`` every other node
        accepted meanwhile runs there now."""
        if self._command is not None and not self._waiting:
            self._finish()

    def _unplace(self, key: Key) -> None:
        """Drop a subscription refused somewhere (by another node, or this node's core) from the nodes
        it is on."""
        pattern, group = key
        rest = pattern if group is None else b"%s GROUP %s" % (pattern, group)
        for node, placed in self._placed.items():
            if key in placed:
                placed.discard(key)
                self._conn.upstream_to(node).capture(b"UNSUBSCRIBE", rest, ignored_answer)

    def place(self) -> None:
        """Place every subscription on each live member that lacks it (a node that joined, one whose
        link broke); forget the members that are gone."""
        if not self.subscriptions:
            return
        members = self._conn.remote_members()
        for node in [node for node in self._placed if node not in members]:
            del self._placed[node]
        for node in members:
            placed = self._placed.setdefault(node, set())
            for key, rest in self.subscriptions.items():
                if key not in placed:
                    placed.add(key)
                    self._conn.upstream_to(node).capture(
                        b"SUBSCRIBE", rest, partial(self._placed_answer, node, key)
                    )

    def _placed_answer(self, node: str, key: Key, answer: bytes | None) -> None:
        if answer is None or answer.startswith(b"ERROR "):
            self._placed.get(node, set()).discard(key)
            if answer is not None:
                log.warning("node %s refused a client's pattern subscription: %s", node, answer[:200])

    def lost(self, node: str) -> None:
        """The client's link to ``node`` is gone, with what it held there: place it again soon (if
        ``node`` is still a member then)."""
        self._placed.pop(node, None)
        if self.subscriptions:
            asyncio.get_running_loop().call_later(PLACE_AGAIN, self._conn.members_changed)


def ignored_answer(answer: bytes | None) -> None:
    """The answer to a command the node sent for itself and has nothing to do with."""
