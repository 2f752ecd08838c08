"""The command-line tools: ``pigeon`` (``server``) and ``pigeon-cli`` (``client``) with its subcommands."""
