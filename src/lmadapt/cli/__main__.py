"""``python -m lmadapt.cli`` is the ``lmadapt`` command."""

from lmadapt.cli import main

raise SystemExit(main())
