"""`python -m detpact ...` (also the torchrun entry point)."""

from detpact.cli import main

raise SystemExit(main())
