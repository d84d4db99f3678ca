"""LoRA over a quantised base (train.quant with train.lora; train.qlora = LoRA over int4wo):
the adapters are the only thing that trains, the checkpoint is plain and re-quantises to
the same bits, and inference's float model (quantised weights' values + merged adapters)
computes what training computed."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from detpact.commands.lora import merge_bundle
from detpact.config import validate_config
from detpact.config.train import LoRAConfig, TrainConfig
from detpact.inference.predictor import float_model
from detpact.models.lora import LoRALayer, apply_lora
from detpact.models.quant import QuantisedLinear, apply_quant

pytest.importorskip("torchao", reason="train.quant needs the adapt extra")

from test_quant import TINY_RTDETR, boxes_and_logits, rtdetr  # noqa: E402  (after the skip: it needs torchao too)

CPU = torch.device("cpu")
ADAPTERS = LoRAConfig(r=4, target="all_linear")


def adapted_int8(seed: int = 0) -> tuple[nn.Module, dict]:
    """A tiny rtdetr with its Linear layers int8-quantised, then adapted (as the loop does)."""
    model = rtdetr(seed)
    record = apply_quant(model, "int8wo", required=True, device=CPU)
    apply_lora(model, ADAPTERS)
    return model, record


def test_qlora_is_lora_over_int4_and_its_rules_are_checked():
    assert TrainConfig.model_validate({"qlora": True, "lora": {"r": 8}}).quant == "int4wo"
    for bad, match in (({"qlora": True}, "needs adapters"),
                       ({"qlora": True, "lora": {"r": 8, "freeze_base": False}}, "freeze_base must stay true"),
                       ({"qlora": True, "lora": {"r": 8}, "quant": "int8wo"}, "means an int4wo base")):
        with pytest.raises(ValidationError, match=match):
            TrainConfig.model_validate(bad)
    # LoRA over an int8 base is plain train.quant + train.lora
    assert TrainConfig.model_validate({"quant": "int8wo", "lora": {"r": 8}}).quant == "int8wo"


def test_adapters_wrap_the_quantised_layers_and_start_from_the_quantised_model():
    model = rtdetr()
    apply_quant(model, "int8wo", required=True, device=CPU)
    images = torch.rand(2, 3, 64, 64)
    before = boxes_and_logits(model, images)
    quantised = [name for name, m in model.named_modules() if isinstance(m, QuantisedLinear)]
    report = apply_lora(model, ADAPTERS)
    assert report["layers"] == quantised  # every quantised Linear, no other layer
    adapted = {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}
    assert all(m.quantised is not None and m.weight is None for m in adapted.values())
    # B = 0: the quantised model, up to the int8 kernel's float rounding (5e-7 measured; each layer alone is exact)
    assert (boxes_and_logits(model, images) - before).abs().max() < 1e-5
    # the checkpoint's keys are those of the float model with the same adapters
    float_adapted = rtdetr()
    apply_lora(float_adapted, ADAPTERS)
    assert model.state_dict().keys() == float_adapted.state_dict().keys()


def test_only_the_adapters_train_and_the_quantised_weights_stay():
    model, _ = adapted_int8()
    model.train()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(("lora_a", "lora_b"))}
    qweights = [m.quantised.qweight.dequantize().clone() for m in model.modules() if isinstance(m, LoRALayer)]
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(n.endswith(("lora_a", "lora_b")) for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.SGD(params, lr=0.1)
    for _ in range(2):
        out = model(torch.rand(2, 3, 64, 64))
        (out.cls_logits.sigmoid().mean() + out.boxes.mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
    state = model.state_dict()
    changed = [k for k in state if k.endswith("lora_b") and state[k].abs().sum() > 0]
    assert changed  # the adapters moved
    for key, value in frozen.items():  # float bases, biases, norms and BatchNorm statistics... of the base
        if "running" in key or "num_batches" in key:
            continue  # BatchNorm statistics follow the data unless model.freeze_bn
        assert torch.equal(state[key], value), key
    after = [m.quantised.qweight.dequantize() for m in model.modules() if isinstance(m, LoRALayer)]
    assert all(torch.equal(a, b) for a, b in zip(after, qweights))


def test_a_checkpoint_reloads_to_the_same_bits_and_infers_as_trained():
    model, record = adapted_int8()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRALayer):
                layer.lora_b.normal_(0, 0.05)
    model.eval()
    images = torch.rand(2, 3, 64, 64)
    trained = boxes_and_logits(model, images)
    state = model.state_dict()
    # resume: a fresh quantised + adapted model (another seed) loads the checkpoint to the same bits
    resumed, _ = adapted_int8(seed=1)
    resumed.load_state_dict(state)
    assert torch.equal(boxes_and_logits(resumed.eval(), images), trained)
    # inference: the float model with the quantised weights' values, adapters kept or merged
    cfg = validate_config({"config_version": 1, "data": {"format": "synthetic", "path": "data"}, "model": TINY_RTDETR,
                           "train": {"quant": "int8wo", "lora": ADAPTERS.model_dump()}})
    bundle = {"weights": {"quant": record}}
    unmerged = float_model(cfg, 5, state, bundle, merge_lora=False).eval()
    merged = float_model(cfg, 5, state, bundle).eval()
    assert not any(isinstance(m, (LoRALayer, QuantisedLinear)) for m in merged.modules())
    assert (boxes_and_logits(unmerged, images) - trained).abs().max() < 1e-4
    assert (boxes_and_logits(merged, images) - boxes_and_logits(unmerged, images)).abs().max() < 1e-4
    # the float bases alone (without the quantised values) are further off: the comparison can fail
    plain = float_model(cfg, 5, state, {"weights": {}}, merge_lora=False).eval()
    assert (boxes_and_logits(plain, images) - trained).abs().max() > 1e-4

    # `detpact lora merge`: a plain float checkpoint that loads as an unquantised run, to the same outputs
    plain_bundle = merge_bundle({"config": cfg.model_dump(mode="json"), "model": state, "ema": None,
                                 "class_names": list("abcde"), "weights": bundle["weights"], "config_hash": "x"},
                                "best.pt")
    assert plain_bundle["config"]["train"]["quant"] == "none" and plain_bundle["config"]["train"]["lora"]["r"] == 0
    assert plain_bundle["weights"]["quant"] is None and plain_bundle["lora_merged"]["quant"] == record
    again = validate_config(plain_bundle["config"])
    reloaded = float_model(again, 5, plain_bundle["model"], plain_bundle).eval()
    assert reloaded.state_dict().keys() == merged.state_dict().keys()
    assert all(torch.equal(value, merged.state_dict()[key]) for key, value in reloaded.state_dict().items())
    assert (boxes_and_logits(reloaded, images) - boxes_and_logits(merged, images)).abs().max() < 1e-5
