from qkvcomm_cli.main import main

raise SystemExit(main())
