from mae_service.cli import main

raise SystemExit(main())
