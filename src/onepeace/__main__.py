from onepeace.cli import main

raise SystemExit(main())
