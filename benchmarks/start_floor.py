"""The least a broker on CPython, asyncio and uvloop does before its first reply, and nothing more.

benchmarks/recovery.py starts it as the ``floor`` broker: the interpreter starts, imports asyncio
and uvloop, listens on a free loopback port, prints "listening on 127.0.0.1:<port>", and answers
every chunk a client sends with one line. The time from its exec to that line, beside a broker's
time to its first message after a restart, is the part of the broker's that Python itself takes.
"""

import asyncio
from typing import cast

import uvloop


class Answer(asyncio.Protocol):
    """Answers each chunk received with one line."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport to answer on."""
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """One line back for whatever came."""
        self.transport.write(b"MESSAGE floor\r\n")


async def serve() -> None:
    """Listen, say where, answer until killed."""
    server = await asyncio.get_running_loop().create_server(Answer, "127.0.0.1", 0)
    print(f"listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve())
