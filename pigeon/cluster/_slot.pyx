# cython: language_level=3
"""The slot of a topic, in C: CRC-32C of its name modulo ``SLOTS`` (pigeon/cluster/slots.py).

A module of its own, apart from the core: the clients route by slot (``ClusterClient``) and do not
load the broker's core. Replication's C walks compute the same with the same C
(pigeon/cluster/_slot.pxd).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

from pigeon._crc32c cimport crc32c_choose

crc32c_choose(1)


def slot_of(bytes topic not None):
    """The slot of ``topic`` (its name's bytes): CRC-32C modulo ``SLOTS``."""
    return topic_slot(<const unsigned char *>PyBytes_AS_STRING(topic), PyBytes_GET_SIZE(topic))
