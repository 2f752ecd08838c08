from collections.abc import Iterable

class PlainLines(bytes):
    """Whole lines of a client (joined by ``\\n``, the last without it) whose verbs the router does
    not route: they go to this node's core as they are, one item of ``InputScanner.split_lines``."""

class InputScanner:
    """Cuts a client's input into the items the router routes: the verbs ``routed`` (upper-case ASCII
    words) are those it looks at, of which ``framed`` begin a frame."""

    def __init__(self, routed: Iterable[bytes], framed: Iterable[bytes]) -> None: ...
    def split_lines(self, data: bytes, pos: int, items: list[bytes]) -> int:
        """Append the whole lines of ``data`` from ``pos`` on to ``items`` (without their ``\\n``):
        each run of lines without a verb as one ``PlainLines``, each line with one as ``bytes``.
        Stops before a line that begins a frame (its verb one of ``framed``, first on the line,
        followed by a blank) and before an unfinished line: returns where."""

def command_fields(line: bytes, maxsplit: int = -1) -> list[bytes]:
    """The fields of a command line (without its ``\\n``) as the core reads them: like
    ``line.split(None, maxsplit)``, but only spaces and tabs separate fields and one final ``\\r``
    ends the line; with ``maxsplit``, the last field is the rest of the line as it is (a frame's
    payload, its own final ``\\r`` included), from its first byte that is no blank."""

def publish_slots(lines: bytes, prefix: int) -> list[int] | None:
    """The slots of the topics of ``lines``, whole lines (each ending with ``\\n``) that each begin
    with the same ``PUBLISH <id> `` of ``prefix`` bytes, without repeats: the topic is the field after
    that prefix, as ``command_fields`` reads it. None when a line has no topic right after the prefix
    (a blank there, or the end of the line), so that the router reads such lines one by one."""
