from clex.cli.main import main

raise SystemExit(main())
