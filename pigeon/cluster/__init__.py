"""Clustering on etcd (docs/cluster.md): several ``pigeon`` nodes act as one broker.

``etcd.py`` starts a local etcd and parses ``etcd://`` endpoint lists, ``slots.py`` maps topics to
slots and slots to their preferred owners, ``node.py`` keeps this node's lease, the member set and the
slots it owns, ``router.py`` forwards a client's commands for other nodes' topics to their owners.
"""
