"""How a Pigeon cluster's throughput grows with nodes, by simulation of where the work lands.

    python -m benchmarks.cluster_scaling [--nodes 1,2,3,4,6,8,16] [--topics 1000] [--skew 0,1]
                                         [--forward-cost 1.0] [--json FILE]

One machine cannot show a cluster of many nodes, so this computes it. The simulation uses the
cluster's own rules: topics go to slots by ``slot_of`` and slots to nodes by ``preferred_owner``
(rendezvous hashing over the members, pigeon/cluster/slots.py). Topics get traffic by a Zipf law of
exponent ``--skew`` (0: every topic the same; 1: the k-th topic gets 1/k of the first's). Each node
has the same capacity, one unit: the messages per second one node serves when all of its traffic is
its own. A message costs its owner one unit of work per message. A client that connects to a random
node (``random``) gets about (n-1)/n of its messages forwarded, and a forwarded message also costs
the entry node ``--forward-cost`` units (the router reads, parses and relays it, and relays the
delivery back). A client that follows redirects (``redirect``: ``ClusterClient``) always talks to the
owner, so nothing is forwarded.

The cluster's throughput is the total rate at which its busiest node reaches its capacity, in units
of one node. The limit is the busiest node: with skewed traffic, the most popular topic's owner
saturates first, and no number of nodes carries a topic faster than one node (a topic has one
owner). The figures say how the work spreads over the nodes, not how fast a node is: multiply by a
measured one-node rate (BENCHMARKS.md) for messages per second.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

from pigeon.cluster.slots import preferred_owner, slot_of


@dataclass(frozen=True)
class Scenario:
    """One simulated cluster and its throughput in units of one node's capacity."""

    nodes: int
    skew: float
    clients: str
    throughput: float
    busiest_share: float


def topic_weights(topics: int, skew: float) -> list[float]:
    """Each topic's share of the messages under a Zipf law of exponent ``skew`` (sums to 1)."""
    raw = [1.0 / (k + 1) ** skew for k in range(topics)]
    total = sum(raw)
    return [w / total for w in raw]


def node_loads(nodes: int, weights: list[float], forward_cost: float, redirect: bool) -> list[float]:
    """Work per node for a total rate of one message per second, spread as ``weights`` say."""
    members = [f"n{i + 1}" for i in range(nodes)]
    index = {name: i for i, name in enumerate(members)}
    loads = [0.0] * nodes
    for topic, weight in enumerate(weights):
        owner = preferred_owner(slot_of(b"topic.%d" % topic), members)
        assert owner is not None
        loads[index[owner]] += weight
        if not redirect and nodes > 1:
            # the client's node is any of the n; the n-1 others forward and pay the router's work
            for i in range(nodes):
                if i != index[owner]:
                    loads[i] += weight * forward_cost / nodes
    return loads


def simulate(nodes: int, topics: int, skew: float, forward_cost: float, redirect: bool) -> Scenario:
    """The throughput of one cluster: the rate at which its busiest node is saturated."""
    loads = node_loads(nodes, topic_weights(topics, skew), forward_cost, redirect)
    busiest = max(loads)
    return Scenario(nodes, skew, "redirect" if redirect else "random", 1.0 / busiest, busiest / sum(loads))


def main() -> int:
    """Print (and optionally save) the throughput table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1,2,3,4,6,8,16")
    parser.add_argument("--topics", type=int, default=1000)
    parser.add_argument("--skew", default="0,1")
    parser.add_argument(
        "--forward-cost", type=float, default=1.0, help="entry node's work per forwarded message"
    )
    parser.add_argument("--json", help="also write the scenarios to this file")
    args = parser.parse_args()
    scenarios = [
        simulate(n, args.topics, float(skew), args.forward_cost, redirect)
        for skew in args.skew.split(",")
        for redirect in (True, False)
        for n in (int(x) for x in args.nodes.split(","))
    ]
    print(f"{args.topics} topics, forward cost {args.forward_cost} (throughput in units of one node)")
    print(f"{'skew':>5} {'clients':>9} {'nodes':>5} {'throughput':>10} {'busiest node share':>19}")
    for s in scenarios:
        print(f"{s.skew:>5} {s.clients:>9} {s.nodes:>5} {s.throughput:>10.2f} {s.busiest_share:>19.1%}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump([asdict(s) for s in scenarios], out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
