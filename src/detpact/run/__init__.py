"""The run directory: fixed artifact paths, atomic writes, checkpoints and reports."""
