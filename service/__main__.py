"""``python -m service`` is the same as the ``ultrafastbert`` console script."""

from service.cli import main

raise SystemExit(main())
