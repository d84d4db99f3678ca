"""Postprocessing inside the ONNX graph (`export --nms`), appended to the raw model.

The raw model outputs boxes [B, A, 4] and scores [B, A, C] for every candidate. The
appended nodes do what models/postprocess.py does, per image:

- dense heads: the `pre_nms_topk` best (candidate, class) pairs, class-wise greedy NMS
  (ONNX NonMaxSuppression over boxes shifted per class, as `batched_nms` shifts them)
  with `score_threshold` and `iou_threshold`, the first `max_det` kept;
- NMS-free heads: the `max_det` best pairs above `score_threshold`.

Outputs: boxes [B, max_det, 4] xyxy, scores [B, max_det], labels [B, max_det] int64 and
num_dets [B] int64. Image b's detections are its first num_dets[b] rows, best first; the
rest is padding (boxes and scores 0, label -1). An image without detections has
num_dets 0; more candidates than max_det are cut to the best max_det.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from detpact.config import PostprocessConfig

RAW = {"boxes": "raw_boxes", "scores": "raw_scores"}
OUTPUTS = ("boxes", "scores", "labels", "num_dets")


class _Builder:
    """Appends nodes and constants to a graph, naming each value uniquely."""

    def __init__(self, graph: onnx.GraphProto, opset: int):
        self.graph, self.opset = graph, opset
        self.count = 0

    def reduce(self, op: str, data: str, axes: list[int], keepdims: int) -> str:
        """ReduceX over `axes`: an input from opset 18 (13 for ReduceSum), an attribute before."""
        if self.opset >= (13 if op == "ReduceSum" else 18):
            return self(op, data, self.const(axes), keepdims=keepdims)
        return self(op, data, axes=axes, keepdims=keepdims)

    def const(self, value, dtype=np.int64) -> str:
        name = self._name("const")
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def __call__(self, op: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        names = [self._name(op.lower()) for _ in range(outputs)]
        self.graph.node.append(helper.make_node(op, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def _name(self, stem: str) -> str:
        self.count += 1
        return f"nms/{stem}_{self.count}"


def append_postprocess(model: onnx.ModelProto, post: PostprocessConfig, nms: bool) -> onnx.ModelProto:
    """`model` (outputs boxes, scores) with the postprocessing appended in place; returns it."""
    graph = model.graph
    _rename_raw_outputs(graph)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    g = _Builder(graph, opset)
    boxes, scores = RAW["boxes"], RAW["scores"]
    zero, one, two = g.const([0]), g.const([1]), g.const([2])

    # The best k (location, class) pairs of each image, best first.
    shape = g("Shape", scores)  # [B, A, C]
    batch, num_classes = g("Slice", shape, zero, one), g("Slice", shape, two, g.const([3]))
    flat = g("Reshape", scores, g.const([0, -1]))  # [B, A*C]
    pairs = g("Slice", g("Shape", flat), one, two)
    k = g("Min", g.const([post.pre_nms_topk if nms else post.max_det]), pairs)
    top_scores, top_index = g("TopK", flat, k, outputs=2, axis=-1, largest=1, sorted=1)  # [B, k]
    location = g("Div", top_index, num_classes)
    labels = g("Mod", top_index, num_classes)
    gather_at = g("Expand", g("Unsqueeze", location, g.const([-1])), g("Concat", batch, k, g.const([4]), axis=0))
    cand_boxes = g("GatherElements", boxes, gather_at, axis=1)  # [B, k, 4]

    if nms:
        selected = _class_wise_nms(g, cand_boxes, top_scores, labels, post)  # [K, 3]: (image, 0, pair)
        image = g("Gather", selected, g.const(0), axis=1)  # [K]
        at = g("Concat", g("Unsqueeze", image, one), g("Slice", selected, two, g.const([3]), one), axis=1)
        # Each selected pair's rank within its image: NMS lists them image by image, best first.
        per_image = g("Cast", g("Equal", g("Unsqueeze", image, one),
                                g("Unsqueeze", g("Range", g.const(0), g("Squeeze", batch, zero), g.const(1)), zero)),
                      to=TensorProto.INT64)  # [K, B]
        rank = g("Sub", g("GatherElements", g("CumSum", per_image, g.const(0)), g("Unsqueeze", image, one), axis=1),
                 one)  # [K, 1]
        slot = g("Concat", g("Unsqueeze", image, one), rank, axis=1)  # [K, 2]: where each detection goes
        out = {"boxes": g("GatherND", cand_boxes, at), "scores": g("GatherND", top_scores, at),
               "labels": g("GatherND", labels, at)}
        num_dets = g.reduce("ReduceSum", per_image, [0], keepdims=0)  # [B]
        results = {}
        for name, fill, tail in (("boxes", 0.0, [post.max_det, 4]), ("scores", 0.0, [post.max_det]),
                                 ("labels", -1, [post.max_det])):
            dtype = np.int64 if name == "labels" else np.float32
            blank = g("ConstantOfShape", g("Concat", batch, g.const(tail), axis=0),
                      value=numpy_helper.from_array(np.array([fill], dtype)))
            results[name] = g("ScatterND", blank, slot, out[name])
    else:
        valid = g("Greater", top_scores, g.const(post.score_threshold, np.float32))  # [B, k], valid rows first
        num_dets = g.reduce("ReduceSum", g("Cast", valid, to=TensorProto.INT64), [1], keepdims=0)
        pad = g("Sub", g.const([post.max_det]), k)  # the top-k has min(max_det, A*C) rows
        results = {}
        for name, value, fill in (("boxes", cand_boxes, 0.0), ("scores", top_scores, 0.0), ("labels", labels, -1)):
            dtype = np.int64 if name == "labels" else np.float32
            fill_value = g.const(fill, dtype)
            mask = g("Unsqueeze", valid, g.const([-1])) if name == "boxes" else valid
            kept = g("Where", mask, value, fill_value)
            rank = 3 if name == "boxes" else 2
            pads = g("Concat", g.const([0, 0]), *([g.const([0])] * (rank - 2)), g.const([0]), pad,
                     *([g.const([0])] * (rank - 2)), axis=0)
            results[name] = g("Pad", kept, pads, fill_value)
    results["num_dets"] = num_dets

    del graph.output[:]
    for name in OUTPUTS:
        graph.node.append(helper.make_node("Identity", [results[name]], [name]))
    batch_dim = "batch"
    graph.output.extend([
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [batch_dim, post.max_det, 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch_dim, post.max_det]),
        helper.make_tensor_value_info("labels", TensorProto.INT64, [batch_dim, post.max_det]),
        helper.make_tensor_value_info("num_dets", TensorProto.INT64, [batch_dim]),
    ])
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used or not init.name.startswith("nms/")]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model


def _class_wise_nms(g: _Builder, boxes: str, scores: str, labels: str, post: PostprocessConfig) -> str:
    """ONNX NonMaxSuppression per class: each class's boxes shifted into their own region of
    the plane by the span of the image's candidates above the score threshold + 1, as
    models/boxes.batched_nms does. Returns the selected [K, 3] (image, 0, candidate index)."""
    valid = g("Unsqueeze", g("Greater", scores, g.const(post.score_threshold, np.float32)), g.const([-1]))
    lowest = g.reduce("ReduceMin", g("Where", valid, boxes, g.const(np.inf, np.float32)), [1, 2], keepdims=1)
    highest = g.reduce("ReduceMax", g("Where", valid, boxes, g.const(-np.inf, np.float32)), [1, 2], keepdims=1)
    span = g("Add", g("Sub", highest, lowest), g.const(1.0, np.float32))  # [B, 1, 1]; inf without candidates
    span = g("Where", g("IsInf", span), g.const(1.0, np.float32), span)
    shifted = g("Add", boxes, g("Mul", g("Unsqueeze", g("Cast", labels, to=TensorProto.FLOAT), g.const([-1])), span))
    return g("NonMaxSuppression", shifted, g("Unsqueeze", scores, g.const([1])), g.const([post.max_det]),
             g.const([post.iou_threshold], np.float32), g.const([post.score_threshold], np.float32))


def _rename_raw_outputs(graph: onnx.GraphProto) -> None:
    """The raw outputs become internal values (raw_boxes, raw_scores), freeing their names."""
    for node in graph.node:
        node.output[:] = [RAW.get(name, name) for name in node.output]
        node.input[:] = [RAW.get(name, name) for name in node.input]
