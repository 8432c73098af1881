"""`python -m qkvcomm_cli`: the `qkvcomm` command without an installed entry point."""
from qkvcomm_cli.main import main

raise SystemExit(main())
