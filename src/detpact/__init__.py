"""detpact: an object-detection training harness built around a run contract.

    import detpact
    run = detpact.train("configs/quickstart.yaml", run_id="exp01")
    detpact.evaluate(run.root)
    detpact.export(run.root)
    detpact.predict(run.root, ["photos/"], out="preds.json")
    detpact.verify(run.root)
    detpact.report(run.root)          # plots + reports/report.html
    detpact.preflight("configs/coco128.yaml", output_json="preflight.json")
    detpact.model_info("configs/quickstart.yaml")
"""

__version__ = "0.1.0"  # before the imports below: modules record it

from detpact.errors import DetpactError

_LAZY = {"evaluate": "detpact.api", "export": "detpact.api", "model_info": "detpact.api", "predict": "detpact.api",
         "preflight": "detpact.api", "report": "detpact.api", "train": "detpact.api", "verify": "detpact.api", "Config": "detpact.config",
         "config_hash": "detpact.config", "load_config": "detpact.config"}


def __getattr__(name: str):
    """The API, imported on first use: `import detpact.commands.doctor` must not need torch."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'detpact' has no attribute {name!r}")

__all__ = ["Config", "DetpactError", "config_hash", "evaluate", "export", "load_config", "model_info", "predict", "preflight", "report", "train", "verify"]
