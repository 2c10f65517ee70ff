from vold.cli import main

raise SystemExit(main())
