"""detpact: an object-detection training harness built around a run contract.

    import detpact
    run = detpact.train("configs/quickstart.yaml", run_id="exp01")
    detpact.evaluate(run.root)
    detpact.export(run.root)
    detpact.predict(run.root, ["photos/"], out="preds.json")
    detpact.verify(run.root)
    detpact.preflight("configs/coco128.yaml", output_json="preflight.json")
    detpact.model_info("configs/quickstart.yaml")
"""

__version__ = "0.1.0"  # before the imports below: modules record it

from detpact.api import evaluate, export, model_info, predict, preflight, train, verify
from detpact.config import Config, config_hash, load_config
from detpact.errors import DetpactError

__all__ = ["Config", "DetpactError", "config_hash", "evaluate", "export", "load_config", "model_info", "predict", "preflight", "train", "verify"]
