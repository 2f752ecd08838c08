"""``pigeon-cli cluster``: the nodes of a cluster, the slots and topics each serves, and their health.

It asks the node it connects to for the member set (``CLUSTER STATUS``), then each member for its
own view and its topic count, so a node that is down, or cut off from etcd, shows as such.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pigeon import Client
from pigeon.cli.common import Subparsers, add_connection_options, client_keywords, open_client
from pigeon.cli.stats import table
from pigeon.cluster.slots import slot_of
from pigeon.errors import PigeonError

HEADER = ("NODE", "ADDRESS", "SLOTS", "TOPICS", "HEALTH")


def node_report(name: str, member: dict[str, Any], keywords: dict[str, Any]) -> dict[str, Any]:
    """What node ``name`` says of itself: its slots, its topic count, and whether it sees etcd."""
    host, _, port = str(member.get("address", "")).rpartition(":")
    report: dict[str, Any] = {"node": name, "address": member.get("address"), "slots": len(member["slots"])}
    try:
        with Client(host.strip("[]"), int(port), timeout=5, **keywords) as client:
            own = client.cluster()
            report["topics"] = client.stats()["topics"]
    except (PigeonError, OSError, ValueError) as exc:
        return {**report, "topics": None, "health": f"unreachable: {exc}"}
    report["slots"] = len(own["owned"])
    report["health"] = "ok" if own["etcd"] else "etcd unreachable"
    return report


def _run_cluster(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        seen = client.cluster()
    if args.topic is not None:
        slot = slot_of(args.topic.encode())
        owners = [name for name, member in seen["members"].items() if slot in member["slots"]]
        print(f"topic {args.topic}: slot {slot}, owned by {owners[0] if owners else 'no node now'}")
        return 0
    keywords = {key: value for key, value in client_keywords(args).items() if key not in ("host", "port")}
    reports = [node_report(name, member, keywords) for name, member in seen["members"].items()]
    if args.json:
        print(json.dumps({"seen_by": seen["node"], "unowned": seen["unowned"], "nodes": reports}, indent=2))
        return 0
    rows = [
        (r["node"], r["address"], r["slots"], "-" if r["topics"] is None else r["topics"], r["health"])
        for r in reports
    ]
    print("\n".join(table(HEADER, rows)))
    print(f"{seen['slots'] - seen['unowned']} of {seen['slots']} slots owned (as {seen['node']} sees it)")
    return 0


def register(subparsers: Subparsers) -> None:
    """Add the ``cluster`` subcommand to pigeon-cli."""
    cluster = subparsers.add_parser("cluster", help="list a cluster's nodes, their slots, topics and health")
    add_connection_options(cluster)
    cluster.add_argument("--json", action="store_true", help="print the report as indented JSON")
    cluster.add_argument("--topic", metavar="NAME", help="only say which slot and node serve this topic")
    cluster.set_defaults(func=_run_cluster)
