"""Reliability row 36: every F.interpolate case detpact may export (size (1, 1), scale 2
and 0.5, an odd size; nearest, bilinear and bicubic with align_corners true and false)
comes out of ONNX Runtime within the parity tolerance of PyTorch, through both exporters;
a mode an exporter cannot convert, or a Resize node in an unverified mode, is refused
with an "unsupported resize mode" message."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import helper
from torch import nn

from detpact.errors import DetpactError
from detpact.export.onnx import INPUT_NAME, export_onnx
from detpact.export.resize import check_resize_modes

SIZE = 12
RTOL, ATOL = 1e-3, 1e-5  # export.parity_rtol / parity_atol defaults
TARGETS = {"size11": {"size": (1, 1)}, "scale2": {"scale_factor": 2.0}, "half": {"scale_factor": 0.5},
           "odd": {"size": (7, 5)}}
MODES = {"nearest": {"mode": "nearest"},
         **{f"{mode}_ac{int(corners)}": {"mode": mode, "align_corners": corners}
            for mode in ("bilinear", "bicubic") for corners in (False, True)}}
CASES = {f"{mode}_{target}": {**MODES[mode], **TARGETS[target]} for mode in MODES for target in TARGETS}


class Interpolations(nn.Module):
    """One output per F.interpolate case: a micro-model per case, exported in one go."""

    def __init__(self, cases: dict[str, dict]):
        super().__init__()
        self.cases = list(cases.values())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(F.interpolate(images, **case) for case in self.cases)


@pytest.mark.parametrize("exporter,opset,extra", [("dynamo", 18, {"nearest-exact_scale2": {"mode": "nearest-exact",
                                                                                          "scale_factor": 2.0}}),
                                                  ("torchscript", 17, {})])
def test_every_interpolate_case_matches_onnxruntime(tmp_path, exporter, opset, extra):
    cases = {**CASES, **extra}
    model = Interpolations(cases)
    path = tmp_path / "resize.onnx"
    export_onnx(model, path, SIZE, opset, exporter, output_names=tuple(cases))
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = dict(zip(cases, session.run(list(cases), {INPUT_NAME: images.numpy()})))
    with torch.no_grad():
        want = dict(zip(cases, (t.numpy() for t in model(images))))
    off = {name: float(np.abs(got[name] - want[name]).max()) for name in cases
           if got[name].shape != want[name].shape or not np.allclose(got[name], want[name], rtol=RTOL, atol=ATOL)}
    assert off == {}
    kinds = {(n.op_type, a.s.decode()) for n in onnx.load(str(path)).graph.node for a in n.attribute
             if n.op_type == "Resize" and a.name == "coordinate_transformation_mode"}
    assert kinds == {("Resize", m) for m in ("asymmetric", "half_pixel", "align_corners")}  # all three exported


def test_a_mode_the_exporter_cannot_convert_is_refused(tmp_path):
    model = Interpolations({"exact": {"mode": "nearest-exact", "scale_factor": 2.0}})
    with pytest.raises(DetpactError, match=r"unsupported resize mode: the torchscript ONNX exporter \(opset 17\) "
                                           r"cannot convert aten::_upsample_nearest_exact2d"):
        export_onnx(model, tmp_path / "m.onnx", SIZE, 17, "torchscript", output_names=("exact",))
    assert list(tmp_path.iterdir()) == []  # no file, no temporary left


def resize_graph(**attrs) -> onnx.ModelProto:
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor("scales", onnx.TensorProto.FLOAT, [4], [1, 1, 2, 2])])
    return helper.make_model(graph)


@pytest.mark.parametrize("attrs,problem", [
    ({"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
     "mode=linear, coordinate_transformation_mode=pytorch_half_pixel"),
    ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "round_prefer_floor"},
     "nearest_mode=round_prefer_floor"),
    ({"mode": "linear", "coordinate_transformation_mode": "align_corners", "antialias": 1}, "antialias=1"),
    ({"mode": "cubic", "coordinate_transformation_mode": "half_pixel", "cubic_coeff_a": -0.5}, "cubic_coeff_a=-0.5"),
    ({"mode": "nearest"}, "mode=nearest, coordinate_transformation_mode=half_pixel"),  # the ONNX defaults
])
def test_unverified_resize_attributes_are_refused(attrs, problem):
    with pytest.raises(DetpactError, match=r"model.onnx: unsupported resize mode in Resize node up: .*"
                                           + problem.replace("(", r"\(")):
        check_resize_modes(resize_graph(**attrs), "model.onnx")


@pytest.mark.parametrize("attrs", [
    {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
    {"mode": "linear", "coordinate_transformation_mode": "half_pixel"},
    {"mode": "cubic", "coordinate_transformation_mode": "align_corners", "cubic_coeff_a": -0.75},
])
def test_verified_resize_attributes_pass(attrs):
    check_resize_modes(resize_graph(**attrs), "model.onnx")
