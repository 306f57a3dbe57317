"""``python -m lmadapt`` is the ``lmadapt`` command."""

from lmadapt.cli import main

raise SystemExit(main())
