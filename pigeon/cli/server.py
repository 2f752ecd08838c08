"""The ``pigeon`` command: parse flags, pick the event loop, run the server until a signal."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import ssl
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn

from pigeon._core import FSYNC_MODES, LIMIT_DEFAULTS, keep_heap
from pigeon._version import __version__
from pigeon.protocol import DEFAULT_HOST, DEFAULT_PORT
from pigeon.server import logs, signals
from pigeon.server.limits import raise_open_files_limit
from pigeon.server.loops import loop_factory
from pigeon.server.protocol import Server, format_address, is_loopback
from pigeon.server.store import StoreError, inspect
from pigeon.server.tls import DEFAULT_HANDSHAKE_TIMEOUT, node_context, server_context

if TYPE_CHECKING:
    from pigeon.server.monitor import Monitor

log = logging.getLogger("pigeon")

DEFAULT_HTTP_HOST = "127.0.0.1"

# (limit, metavar, help) of each limit flag: --max-line sets max_line, and so on.
# Their defaults and ranges are the core's (LIMIT_DEFAULTS; Broker refuses a
# value out of range with a ValueError that names the limit).
_LIMIT_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("max_line", "BYTES", "longest command line; a longer one gets ERROR and closes its connection"),
    (
        "max_backlog",
        "MESSAGES",
        "messages a topic keeps while no subscriber can take them; past it publishers wait",
    ),
    (
        "max_backlog_bytes",
        "BYTES",
        "payload bytes a topic keeps while no subscriber can take them; past them publishers wait",
    ),
    ("max_connections", "N", "open connections; one more gets ERROR and is closed"),
    (
        "max_memory",
        "BYTES",
        "memory the broker holds (messages, topics, connections, buffers); past it publishers wait and "
        "new topics get ERROR",
    ),
    ("max_subscriptions", "N", "topics one connection subscribes to"),
    ("max_topics", "N", "topics the server holds"),
    ("max_pending", "BYTES", "unsent output of one connection that stopped taking it before it is dropped"),
    ("idle_timeout", "SECONDS", "close a connection that sends nothing for this long; 0 is off"),
    ("write_timeout", "SECONDS", "close a connection whose output makes no progress for this long; 0 is off"),
    (
        "default_prefetch",
        "N",
        "unacknowledged messages an ACK subscription may hold when its SUBSCRIBE names no PREFETCH",
    ),
    ("ack_timeout", "SECONDS", "redeliver a message left unacknowledged this long; 0 is off"),
    (
        "max_deliveries",
        "N",
        "deliveries of a message before it is moved to the topic <topic>.dead instead; 0 is no limit",
    ),
    ("max_disk", "BYTES", "log bytes on disk with --data-dir; past it publishers wait; 0 is no limit"),
    (
        "max_payload",
        "BYTES",
        "largest payload of a framed PUB (protocol 2); a larger one gets ERROR PAYLOAD_TOO_LARGE",
    ),
    (
        "group_ttl",
        "SECONDS",
        "a named consumer group (SUBSCRIBE ... GROUP) and its backlog live on this long after its last "
        "subscriber left",
    ),
)


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help formatter, sized to the terminal only when it formats help.

    argparse makes a formatter for every ``add_argument`` too (to check its metavar), and sizing
    one imports shutil (with bz2 and lzma) and asks the terminal: on every start of the server."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24) -> None:
        super().__init__(prog, indent_increment, max_help_position, width=80)
        self._asked_help_position = max_help_position

    def format_help(self) -> str:
        import shutil

        # what HelpFormatter.__init__ does with no width given
        width = shutil.get_terminal_size().columns - 2
        self._width = width
        self._max_help_position = min(self._asked_help_position, max(width - 20, self._indent_increment * 2))
        return super().format_help()


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port from 0 to 65535, not {value}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 3600 seconds, not {text}")
    return value


def _replica_count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def _flag(limit: str) -> str:
    return "--" + limit.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pigeon`` command."""
    parser = _Parser(
        prog="pigeon",
        formatter_class=_HelpFormatter,
        description="Pigeon: a lightweight pub/sub broker. Each message goes to one subscriber, in turn.",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default %(default)s)")
    parser.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help="TCP port; 0 picks a free one (default %(default)s)"
    )
    for limit, metavar, text in _LIMIT_FLAGS:
        default = LIMIT_DEFAULTS[limit]
        parser.add_argument(
            _flag(limit),
            type=type(default),
            default=default,
            metavar=metavar,
            help=f"{text} (default %(default)s)",
        )
    parser.add_argument(
        "--users",
        metavar="FILE",
        help="require CONNECT <user> <password> and apply the users' topic permissions from this TOML "
        "file (docs/security.md; hashes from `pigeon passwd`); SIGHUP reloads it",
    )
    parser.add_argument(
        "--allow-anonymous",
        action="store_true",
        help="listen on a non-loopback --host without --users, accepting that anyone who can reach "
        "the port may publish and consume anything",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="keep every message in a log in DIR until it is done, and recover it at start "
        "(off by default: messages live in memory only)",
    )
    parser.add_argument(
        "--fsync",
        choices=FSYNC_MODES,
        default="everysec",
        help="with --data-dir: always: PUBLISHED after the record is on stable storage; everysec: after "
        "it is written, synced once a second; no: the OS decides (default %(default)s)",
    )
    parser.add_argument(
        "--repair",
        action="store_true",
        help="with --data-dir: keep every sound record of a damaged log, drop the rest, and serve",
    )
    parser.add_argument(
        "--inspect",
        action="store_true",
        help="with --data-dir: print what the data directory holds and exit, without serving",
    )
    parser.add_argument(
        "--http-port",
        type=_port,
        metavar="PORT",
        help="serve /metrics, JSON figures and a dashboard over HTTP on this port; 0 picks a free one "
        "(off by default; needs the 'monitor' extra)",
    )
    parser.add_argument(
        "--http-host",
        default=DEFAULT_HTTP_HOST,
        help="address of the HTTP monitoring listener (default %(default)s)",
    )
    parser.add_argument(
        "--http-allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer HTTP requests whose Host header is NAME (with any port), or NAME:PORT exactly; "
        "repeatable (by default only the listener's own address and localhost)",
    )
    token = parser.add_mutually_exclusive_group()
    token.add_argument(
        "--http-token",
        metavar="TOKEN",
        help="require 'Authorization: Bearer TOKEN' on every HTTP endpoint but /healthz; it shows "
        "everything, per-connection data included (needed to listen for HTTP on a non-loopback address)",
    )
    token.add_argument(
        "--http-token-file",
        metavar="FILE",
        help="as --http-token, with the token read from FILE (surrounding whitespace dropped), "
        "so that it does not show in the process list",
    )
    parser.add_argument(
        "--metrics-topics",
        type=_count,
        default=0,
        metavar="N",
        help="export per-topic Prometheus metrics for the N topics with the most messages published "
        "(default %(default)s: none)",
    )
    parser.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="speak TLS on the client port with this certificate (PEM, with its chain); needs --tls-key",
    )
    parser.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    parser.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="with --tls-cert: require a client certificate signed by a CA in FILE (PEM): mutual TLS",
    )
    parser.add_argument(
        "--tls-map-user",
        action="store_true",
        help="with --tls-ca and --users: a client certificate whose subject's commonName is a user of "
        "the users file logs in as that user with a bare CONNECT",
    )
    parser.add_argument(
        "--tls-handshake-timeout",
        type=_seconds,
        default=DEFAULT_HANDSHAKE_TIMEOUT,
        metavar="SECONDS",
        help="close a TLS client that has not completed its handshake in this time (default %(default)s)",
    )
    parser.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop: uvloop where installed with auto (default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="default %(default)s",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines as text or as one JSON object each (default %(default)s)",
    )
    cluster = parser.add_argument_group("cluster (docs/cluster.md; needs the 'cluster' extra)")
    cluster.add_argument(
        "--cluster",
        metavar="etcd://HOST:PORT[,HOST:PORT...]",
        help="join the cluster coordinated by this etcd: topics are spread over the nodes",
    )
    cluster.add_argument("--node-name", metavar="NAME", help="this node's unique name (default: host:port)")
    cluster.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        help="where clients and other nodes reach this node (default: --host and the bound port)",
    )
    cluster.add_argument(
        "--node-port",
        type=_port,
        metavar="PORT",
        help="also listen on this port (0: a free one) and advertise it, to be reached as this very "
        "process when --port is shared (--workers sets it)",
    )
    cluster.add_argument(
        "--workers",
        type=_count,
        default=0,
        metavar="N",
        help="run N node processes sharing --port (SO_REUSEPORT) as one cluster; without --cluster "
        "they use an etcd of their own that pigeon starts (default %(default)s: one process, no workers)",
    )
    cluster.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    cluster.add_argument(
        "--cluster-ttl",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="lease of this node in etcd: a dead node's topics move after this long (default %(default)s)",
    )
    cluster.add_argument(
        "--replicas",
        type=_replica_count,
        default=0,
        metavar="N",
        help="copy each durable topic's messages to N other nodes before PUBLISHED (to as many as are "
        "live when fewer are), so that losing N nodes loses no confirmed message; needs --data-dir "
        "(default %(default)s)",
    )
    cluster.add_argument(
        "--min-replicas",
        type=_replica_count,
        default=0,
        metavar="M",
        help="refuse a durable PUBLISH (ERROR NOT_ENOUGH_REPLICAS) while fewer than M of the --replicas "
        "successors are live, and hold PUBLISHED until M of them have the message, as Kafka's "
        "min.insync.replicas (default %(default)s: confirm with as many as are live)",
    )
    cluster.add_argument(
        "--node-tls-ca",
        metavar="FILE",
        help="with --tls-cert on a cluster: the CAs (PEM) that signed the other nodes' certificates, "
        "which this node checks when it connects to them (default: --tls-ca, else the system's)",
    )
    cluster.add_argument(
        "--node-user",
        metavar="NAME",
        help="the user this node logs in as on other nodes (a user of the users file with cluster = true), "
        "for replication where nodes run with --users; its password comes from --node-password-file or "
        "the environment variable PIGEON_NODE_PASSWORD, never from the command line",
    )
    cluster.add_argument(
        "--node-password-file",
        metavar="FILE",
        help="read --node-user's password from FILE (surrounding whitespace dropped)",
    )
    parser.add_argument("--version", action="version", version=f"pigeon {__version__}")
    return parser


def _limits(args: argparse.Namespace) -> dict[str, Any]:
    """The limit flags as ``Server`` keywords."""
    return {limit: getattr(args, limit) for limit, _, _ in _LIMIT_FLAGS}


def _limit_error(exc: ValueError) -> str:
    """The core's "max_backlog must be ..." as "argument --max-backlog: must be ..."."""
    limit, _, rest = str(exc).partition(" ")
    if limit in LIMIT_DEFAULTS:
        return f"argument {_flag(limit)}: {rest}"
    return str(exc)


def _bind_error(exc: OSError) -> str:
    """What went wrong binding, as the system says it ("address already in use")."""
    if exc.errno is not None:
        text = os.strerror(exc.errno)
        return text[:1].lower() + text[1:]
    return str(exc)


def _raise_open_files_limit(max_connections: int) -> None:
    """Let the process hold max_connections sockets, as far as the hard limit allows (as Redis does)."""
    # room for the listener, the log and the interpreter's own files
    want = max_connections + 64
    limit = raise_open_files_limit(want)
    if limit is not None and limit < want:
        log.warning(
            "open files limit %d is below --max-connections %d: accept will fail before the limit",
            limit,
            max_connections,
        )


async def shutdown(server: Server, monitor: Monitor | None) -> None:
    """Stop the monitor and the server, and log the messages that go with the process."""
    if monitor is not None:
        await monitor.stop()
    await server.stop()
    # every connection is gone: what the core still holds sits in backlogs
    held = server.broker.stats()["backlog_messages"]
    if server.store is not None:
        log.info("shutting down: %d messages kept in %s for the next start", held, server.store.directory)
    else:
        log.info("shutting down: dropping %d messages held in memory (backlogs and unsent output)", held)


def _tls_note(context: ssl.SSLContext | None) -> str:
    """What the start-up line says about TLS."""
    if context is None:
        return ""
    if context.verify_mode == ssl.CERT_REQUIRED:
        return ", TLS on (client certificates required)"
    return ", TLS on"


def _tls_context(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ssl.SSLContext | None:
    """The server's TLS context from --tls-cert, --tls-key and --tls-ca, or None without them."""
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_ca is not None:
            parser.error("--tls-ca needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        parser.error("--tls-cert and --tls-key go together")
    try:
        return server_context(args.tls_cert, args.tls_key, args.tls_ca)
    except (OSError, ssl.SSLError) as exc:
        parser.error(
            f"cannot use the TLS files --tls-cert {args.tls_cert} --tls-key {args.tls_key}"
            f"{'' if args.tls_ca is None else ' --tls-ca ' + args.tls_ca}: {exc}"
        )


def _http_token(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str | None:
    """The monitoring token from --http-token or --http-token-file; refuses an empty one, and a
    non-loopback --http-host without one."""
    token: str | None = args.http_token
    if args.http_token_file is not None:
        try:
            with open(args.http_token_file, encoding="utf-8") as file:
                token = file.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            parser.error(f"cannot read --http-token-file {args.http_token_file}: {exc}")
    if token is not None and not token.strip():
        parser.error("the monitoring token is empty")
    if token is None and args.http_port is not None and not is_loopback(args.http_host):
        parser.error(
            f"refusing to serve monitoring on {args.http_host} without a token: anyone who reaches it "
            "would read the broker's figures and its clients' addresses; give --http-token TOKEN or "
            "--http-token-file FILE, or keep --http-host on a loopback address (the default 127.0.0.1)"
        )
    return token


async def serve(server: Server, loop_name: str, monitor: Monitor | None = None) -> int:
    """Run ``server`` (and ``monitor``) until SIGINT, SIGTERM or SIGQUIT, then stop; returns the exit code.

    Raises OSError when the broker's own address cannot be bound.
    """
    await server.start()
    if monitor is not None:
        try:
            await monitor.start()
        except OSError as exc:
            log.error(
                "cannot listen on %s for HTTP: %s",
                format_address((monitor.host, monitor.port)),
                _bind_error(exc),
            )
            await server.stop()
            return 1
        log.info("monitoring on http://%s/", format_address((monitor.host, monitor.port)))
    stop = asyncio.Event()
    signals.install(asyncio.get_running_loop(), stop.set, server.broker.stats, server.reload_users)
    # only now, so that whoever waits for this line can signal a clean stop at once
    log.info(
        "pigeon %s listening on %s (%s)%s",
        __version__,
        format_address((server.host, server.port)),
        loop_name,
        _tls_note(server.tls),
    )
    await stop.wait()
    await shutdown(server, monitor)
    return 0


def protected_mode_refusal(host: str) -> str:
    """The message ``pigeon`` exits with when told to listen on a reachable address with no users file."""
    return (
        f"refusing to listen on {host or 'every interface'} without authentication: anyone who can "
        "reach it could publish and consume every topic. Either give a users file with --users FILE "
        "(see docs/security.md; make password hashes with `pigeon passwd`), or start with "
        "--allow-anonymous to accept that risk knowingly."
    )


def _inspect(data_dir: str) -> int:
    """``pigeon --data-dir DIR --inspect``: print what DIR holds; 1 when it cannot be read."""
    try:
        for line in inspect(data_dir):
            print(line)
    except StoreError as exc:
        log.error("%s", exc)
        return 1
    return 0


def _new_server(args: argparse.Namespace) -> Callable[..., Server]:
    """``Server``, or with --cluster a ``ClusterServer`` with the cluster flags already given."""
    if args.cluster is None:
        return Server
    from pigeon.cluster.etcd import parse_endpoints
    from pigeon.cluster.server import ClusterServer

    return partial(
        ClusterServer,
        endpoints=parse_endpoints(args.cluster),
        node_name=args.node_name or args.advertise or f"{args.host}:{args.port}",
        advertise=args.advertise,
        node_port=args.node_port,
        reuse_port=args.reuse_port,
        lease_ttl=args.cluster_ttl,
        replicas=args.replicas,
        min_replicas=args.min_replicas,
        node_login=_node_login(args),
        node_tls=_node_tls(args),
    )


def _node_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """With --tls-cert, the context this node connects to the others with: they speak TLS too."""
    if args.tls_cert is None:
        return None
    return node_context(args.tls_cert, args.tls_key, args.node_tls_ca or args.tls_ca)


def _node_login(args: argparse.Namespace) -> tuple[str, str] | None:
    """--node-user and its password (from --node-password-file, else $PIGEON_NODE_PASSWORD), or None.

    Raises UsersError when one comes without the other or the file cannot be read."""
    from pigeon.cluster.server import NODE_PASSWORD_ENV
    from pigeon.server.users import UsersError

    password = os.environ.get(NODE_PASSWORD_ENV)
    if args.node_password_file is not None:
        try:
            with open(args.node_password_file, encoding="utf-8") as file:
                password = file.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsersError(f"cannot read --node-password-file {args.node_password_file}: {exc}") from None
    if args.node_user is None:
        if args.node_password_file is not None:
            raise UsersError("--node-password-file needs --node-user")
        return None
    if not password:
        raise UsersError(
            f"--node-user {args.node_user!r} needs a password: --node-password-file or {NODE_PASSWORD_ENV}"
        )
    return args.node_user, password


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pigeon`` console script; returns the exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["passwd"]:
        from pigeon.cli.passwd import run

        return run()
    parser = build_parser()
    args = parser.parse_args(arguments)
    if (args.repair or args.inspect or args.max_disk) and args.data_dir is None:
        parser.error("--repair, --inspect and --max-disk need --data-dir")
    logs.configure(args.log_level, args.log_format)
    if args.inspect:
        return _inspect(args.data_dir)
    if (args.cluster is not None or args.workers) and args.tls_map_user:
        # a node forwards a client's commands logged in with the client's own CONNECT <user> <password>:
        # a certificate-mapped login has none to give
        parser.error("--cluster and --workers do not work with --tls-map-user (see docs/cluster.md)")
    tls = _tls_context(args, parser)
    if args.tls_map_user and (args.tls_ca is None or args.users is None):
        parser.error("--tls-map-user needs --tls-ca (client certificates) and --users (the users they name)")
    token = _http_token(args, parser)
    if args.users is None and not args.allow_anonymous and not is_loopback(args.host):
        log.error("%s", protected_mode_refusal(args.host))
        return 1
    if args.workers:
        from pigeon.cluster.workers import supervise

        return supervise(args, arguments)
    node_flags = (args.node_name, args.advertise, args.node_user, args.node_password_file, args.node_tls_ca)
    if args.cluster is None and (any(node_flags) or args.node_port is not None):
        parser.error(
            "--node-name, --advertise, --node-port, --node-user, --node-password-file and --node-tls-ca "
            "need --cluster"
        )
    if args.node_tls_ca is not None and tls is None:
        parser.error("--node-tls-ca needs --tls-cert and --tls-key")
    if args.replicas and (args.cluster is None or args.data_dir is None):
        parser.error("--replicas needs --cluster and --data-dir (only durable topics are replicated)")
    if args.min_replicas > args.replicas:
        parser.error("--min-replicas cannot be more than --replicas")
    try:
        server = _new_server(args)(
            args.host,
            args.port,
            data_dir=args.data_dir,
            fsync=args.fsync,
            repair=args.repair,
            users_file=args.users,
            tls=tls,
            tls_handshake_timeout=args.tls_handshake_timeout,
            tls_map_user=args.tls_map_user,
            **_limits(args),
        )
    except ValueError as exc:
        from pigeon.server.users import UsersError  # loaded already when --users was given

        if isinstance(exc, UsersError):
            log.error("--users: %s", exc)
            return 1
        parser.error(_limit_error(exc))
    except ImportError as exc:
        log.error("--cluster needs the cluster extra: pip install 'pigeon-broker[cluster]' (%s)", exc)
        return 2
    try:
        loop_name, new_loop = loop_factory(args.loop)
    except ImportError:
        log.error("--loop uvloop: uvloop is not installed")
        return 2
    _raise_open_files_limit(args.max_connections)
    keep_heap()
    monitor = None
    if args.http_port is not None:
        try:
            from pigeon.server.monitor import Monitor
        except ImportError as exc:
            log.error("--http-port needs the monitor extra: pip install 'pigeon-broker[monitor]' (%s)", exc)
            return 2
        monitor = Monitor(
            server.broker,
            args.http_host,
            args.http_port,
            metrics_topics=args.metrics_topics,
            allow_hosts=args.http_allow_host,
            token=token,
            # with users, per-connection data is for admins: over HTTP, the token's holders
            admin_only=args.users is not None,
            server_stats=server.server_stats,
            cluster_status=server.cluster_status,
        )
    loop = new_loop()
    code = 0
    try:
        code = loop.run_until_complete(serve(server, loop_name, monitor))
    except StoreError as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("cannot listen on %s: %s", format_address((args.host, args.port)), _bind_error(exc))
        return 1
    except KeyboardInterrupt:
        # Windows: no signal handlers, Ctrl-C arrives as KeyboardInterrupt
        log.info("interrupted")
        loop.run_until_complete(shutdown(server, monitor))
    finally:
        loop.close()
    return code
