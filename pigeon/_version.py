"""The one place Pigeon's version is defined."""

__version__ = "0.1.0"
