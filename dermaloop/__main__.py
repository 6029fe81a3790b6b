from dermaloop.cli import main

raise SystemExit(main())
