"""Test-time training (TTT): adapt a copy of the detector to the test images while predicting.

settings.py: the presets (safe, mim_safe, custom), the --ttt* flags and `ttt_settings(args)`.
adapt.py:    what adapts (norm affine parameters) and the objectives (Tent's entropy, MIM's
             masked-image reconstruction).
backend.py:  `TTTBackend` (a Backend over a private copy of the model, with guard rails) and
             `wrap_backend(backend, loaded, settings)`.
"""

from detpact.robustness.ttt.backend import TTTBackend, TTTReport, combine_reports, ttt_backend, wrap_backend
from detpact.robustness.ttt.settings import (
    Guards,
    TTTSettings,
    add_ttt_arguments,
    preset_settings,
    ttt_settings,
)

__all__ = ["Guards", "TTTBackend", "TTTReport", "TTTSettings", "add_ttt_arguments", "combine_reports",
           "preset_settings", "ttt_backend", "ttt_settings", "wrap_backend"]
