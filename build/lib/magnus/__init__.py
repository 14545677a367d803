"""The ``magnus`` command line: one entry point that mounts each package's subcommands."""
