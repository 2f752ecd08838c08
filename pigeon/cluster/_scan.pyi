from collections.abc import Iterable

class VerbScanner:
    """Finds runs of whole lines whose first word (in any case, after any leading blanks) is none of
    the verbs ``routed`` (upper-case ASCII words)."""

    def __init__(self, routed: Iterable[bytes]) -> None: ...
    def plain_run_end(self, data: bytes, pos: int) -> int:
        """Where the run of whole lines of ``data`` that starts at ``pos`` and holds none of the verbs
        ends: just past its last ``\\n``; ``pos`` when the line there has one, or is not whole."""

def command_fields(line: bytes, maxsplit: int = -1) -> list[bytes]:
    """The fields of a command line (without its ``\\n``) as the core reads them: like
    ``line.split(None, maxsplit)``, but only spaces and tabs separate fields and one final ``\\r``
    ends the line; with ``maxsplit``, the last field is the rest of the line as it is (a frame's
    payload, its own final ``\\r`` included), from its first byte that is no blank."""
