"""The `qkvcomm` command line: serve either service, ask, and run a local demo."""
