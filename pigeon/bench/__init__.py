"""The load generator behind ``pigeon-cli bench`` (``load``), its wire dialects and a null broker."""
