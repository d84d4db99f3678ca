"""`registry:` where the model registry (an SQLite database) is."""

from __future__ import annotations

from detpact.config.section import Section


class RegistryConfig(Section):
    # The registry database file. None = registry.db in the runs root (run.output_root,
    # $DETPACT_OUTPUT_DIR or runs). $DETPACT_REGISTRY overrides the file's value, and
    # --set registry.path=... overrides both; the resolved config records the one used.
    path: str | None = None
