"""The Resize modes an exported graph may hold: those PyTorch's F.interpolate exports and
ONNX Runtime computes alike.

The ONNX Resize operator has many modes (coordinate transformations, nearest rounding,
cubic coefficients, antialiasing), and runtimes have disagreed with PyTorch on some of
them (pytorch#183523, ORT#28086). detpact checks every Resize node of an exported graph
against the combinations its tests verify (tests/unit/test_resize_export.py: size (1, 1),
scale 2 and 0.5, odd sizes, nearest, bilinear and bicubic with align_corners true and
false, both exporters) and refuses the others with the node named, rather than ship a
graph whose upsampling quietly differs.
"""

from __future__ import annotations

from typing import Any

import onnx

from detpact.errors import DetpactError

# (mode, coordinate_transformation_mode): the attributes F.interpolate exports to.
VERIFIED_MODES = {
    ("nearest", "asymmetric"),  # mode="nearest" (with nearest_mode floor)
    ("linear", "half_pixel"),  # bilinear, align_corners=False
    ("linear", "align_corners"),  # bilinear, align_corners=True
    ("cubic", "half_pixel"),  # bicubic, align_corners=False
    ("cubic", "align_corners"),  # bicubic, align_corners=True
}
# The other attributes must keep these values (the ONNX defaults PyTorch exports).
_FIXED = {"nearest_mode": "floor", "cubic_coeff_a": -0.75, "antialias": 0, "exclude_outside": 0,
          "keep_aspect_ratio_policy": "stretch"}
_DEFAULTS = {"mode": "nearest", "coordinate_transformation_mode": "half_pixel", **_FIXED,
             "nearest_mode": "round_prefer_floor"}


def resize_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """The node's Resize attributes, ONNX defaults filled in."""
    found = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
    found = {name: value.decode() if isinstance(value, bytes) else value for name, value in found.items()}
    return {**_DEFAULTS, **found}


def unsupported_resize(attrs: dict[str, Any]) -> list[str]:
    """What makes a Resize node's attributes unverified ([] when it is fine)."""
    mode, transform = attrs["mode"], attrs["coordinate_transformation_mode"]
    if (mode, transform) not in VERIFIED_MODES:
        return [f"mode={mode}, coordinate_transformation_mode={transform}"]
    problems = []
    for name, expected in _FIXED.items():
        if name == "nearest_mode" and mode != "nearest" or name == "cubic_coeff_a" and mode != "cubic":
            continue  # ignored by the other modes
        if attrs[name] != expected:
            problems.append(f"{name}={attrs[name]}")
    return problems


def check_resize_modes(model: onnx.ModelProto, where: str) -> None:
    """Refuse a graph (file `where`) with a Resize node in a mode not verified against PyTorch."""
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            graphs += [attr.g for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH]
            if node.op_type != "Resize":
                continue
            problems = unsupported_resize(resize_attributes(node))
            if problems:
                raise DetpactError(
                    f"{where}: unsupported resize mode in Resize node {node.name or '(unnamed)'}: "
                    f"{', '.join(problems)}. detpact exports only the upsampling modes it has checked against "
                    "ONNX Runtime: F.interpolate with mode nearest, bilinear or bicubic (align_corners true or "
                    "false). Change the model's interpolation to one of them.")
