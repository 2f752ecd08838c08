"""Pigeon: a lightweight pub/sub broker with work-queue (round-robin) delivery."""

from pigeon._version import __version__

__all__ = ["__version__"]
