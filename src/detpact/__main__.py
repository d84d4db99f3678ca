"""`python -m detpact ...` (also the torchrun entry point)."""

from detpact.launch import main

raise SystemExit(main())
