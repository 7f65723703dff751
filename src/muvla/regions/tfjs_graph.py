"""A small executor for TensorFlow.js graph models (``model.json`` + ``*.bin``) in PyTorch.

Why our own: the offline COCO detector is published only as a tfjs graph model, and a converter
would pull in TensorFlow (hundreds of MB) for about twenty ops. This module implements exactly the
ops such detector graphs use, with TensorFlow's semantics (NHWC tensors, "SAME" padding that puts
the extra pixel bottom/right, legacy bilinear resize, floor division), and refuses to load a graph
that needs anything else. Tensors stay NHWC; convolutions see them through a channels-last NCHW view,
so there is no layout copy per layer.

Outputs are checked against the pure-JavaScript `@tensorflow/tfjs` CPU backend running the same
graph (tests/fixtures/centernet_tfjs_outputs.json).
"""

from __future__ import annotations

import base64
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor
_NUMPY_DTYPES = {"float32": np.float32, "int32": np.int32, "bool": np.bool_}
_QUANT_DTYPES = {"float16": np.float16, "uint8": np.uint8, "uint16": np.uint16}
_TF_TYPES = {"DT_FLOAT": torch.float32, "DT_INT32": torch.int32, "DT_BOOL": torch.bool}


class GraphError(ValueError):
    """The graph or its weights cannot be loaded or executed (one line: what and where)."""


@dataclass(frozen=True)
class GraphNode:
    """One node of the graph; ``inputs`` are "name" or "name:k" (control inputs dropped)."""

    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: dict[str, Any]


def _decode_attr(value: dict) -> Any:
    """tfjs JSON attribute -> Python value (bytes as str, ints as int, lists as lists)."""
    if "s" in value:
        return base64.b64decode(value["s"]).decode("utf-8")
    if "i" in value:
        return int(value["i"])
    if "f" in value:
        return float(value["f"])
    if "b" in value:
        return bool(value["b"])
    if "type" in value:
        return value["type"]
    if "list" in value:
        items = value["list"]
        if "i" in items:
            return [int(v) for v in items["i"]]
        if "s" in items:
            return [base64.b64decode(v).decode("utf-8") for v in items["s"]]
        if "f" in items:
            return [float(v) for v in items["f"]]
        return []
    return value  # shapes and tensors: kept as given


def _split_input(ref: str) -> tuple[str, int]:
    name, _, index = ref.partition(":")
    return name, int(index) if index else 0


# ------------------------------------------------------------------------------------------ ops
# Each op takes (node, input tensors) and returns one tensor or a tuple of tensors (multi-output ops).


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF "SAME": output = ceil(size / stride); the odd extra pixel goes after (bottom/right)."""
    effective = (kernel - 1) * dilation + 1
    total = max((math.ceil(size / stride) - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def _nhwc_conv(node: GraphNode, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
    """x NHWC, weight OIHW (torch layout) -> NHWC; padding, strides and dilations from the node."""
    _, sh, sw, _ = node.attrs.get("strides", [1, 1, 1, 1])
    _, dh, dw, _ = node.attrs.get("dilations", [1, 1, 1, 1])
    padding = node.attrs.get("padding", "VALID")
    xc = x.permute(0, 3, 1, 2)  # NCHW view of channels-last memory
    if padding == "SAME":
        top, bottom = _same_pads(xc.shape[2], weight.shape[2], sh, dh)
        left, right = _same_pads(xc.shape[3], weight.shape[3], sw, dw)
        if top or bottom or left or right:
            xc = F.pad(xc, [left, right, top, bottom])
    elif padding == "EXPLICIT":
        p = node.attrs.get("explicit_paddings", [])
        xc = F.pad(xc, [p[4], p[5], p[2], p[3]])
    elif padding != "VALID":
        raise GraphError(f"{node.name}: unsupported padding {padding!r}")
    y = F.conv2d(xc.contiguous(memory_format=torch.channels_last), weight, bias, (sh, sw), 0, (dh, dw), groups)
    return y.permute(0, 2, 3, 1)


def _fused_activation(node: GraphNode, y: Tensor) -> Tensor:
    fused = node.attrs.get("fused_ops", [])
    if not fused or fused[0] != "BiasAdd" or len(fused) > 2:
        raise GraphError(f"{node.name}: unsupported fused ops {fused}")
    act = fused[1] if len(fused) == 2 else None
    if act == "Relu":
        return torch.relu(y)
    if act == "Relu6":
        return y.clamp(0.0, 6.0)
    if act is not None:
        raise GraphError(f"{node.name}: unsupported fused activation {act!r}")
    return y


def torch_filter(op: str, filt: Tensor) -> Tensor:
    """TF filter layout -> torch OIHW: HWIO for convolutions, [H, W, C, M] -> [C*M, 1, H, W] for depthwise."""
    if op in ("Conv2D", "_FusedConv2D"):
        weight = filt.permute(3, 2, 0, 1)
    else:
        kh, kw, channels, mult = filt.shape
        weight = filt.permute(2, 3, 0, 1).reshape(channels * mult, 1, kh, kw)
    return weight.contiguous(memory_format=torch.channels_last)


def op_conv2d(node: GraphNode, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Conv2D / _FusedConv2D (``weight`` already in torch layout, see ``torch_filter``)."""
    y = _nhwc_conv(node, x, weight, bias, 1)
    return _fused_activation(node, y) if node.op == "_FusedConv2D" else y


def op_depthwise(node: GraphNode, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """DepthwiseConv2dNative / FusedDepthwiseConv2dNative: one group per input channel."""
    y = _nhwc_conv(node, x, weight, bias, x.shape[-1])
    return _fused_activation(node, y) if node.op == "FusedDepthwiseConv2dNative" else y


def op_max_pool(node: GraphNode, x: Tensor) -> Tensor:
    _, kh, kw, _ = node.attrs["ksize"]
    _, sh, sw, _ = node.attrs["strides"]
    xc = x.permute(0, 3, 1, 2)
    if node.attrs.get("padding") == "SAME":  # padded cells never win: pad with -inf
        top, bottom = _same_pads(xc.shape[2], kh, sh, 1)
        left, right = _same_pads(xc.shape[3], kw, sw, 1)
        xc = F.pad(xc, [left, right, top, bottom], value=float("-inf"))
    return F.max_pool2d(xc, (kh, kw), (sh, sw)).permute(0, 2, 3, 1)


def _resize_axis(x: Tensor, axis: int, out_size: int, align_corners: bool, half_pixel: bool) -> Tensor:
    """Linear interpolation along one axis with TF's source-coordinate rules."""
    in_size = x.shape[axis]
    scale = (in_size - 1) / (out_size - 1) if align_corners and out_size > 1 else in_size / out_size
    pos = torch.arange(out_size, dtype=torch.float32)
    src = (pos + 0.5) * scale - 0.5 if half_pixel else pos * scale
    src = src.clamp(min=0.0)
    lo = src.floor().long().clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    frac = (src - lo.float()).reshape([-1 if d == axis else 1 for d in range(x.dim())])
    a, b = x.index_select(axis, lo), x.index_select(axis, hi)
    return a + (b - a) * frac


def op_resize_bilinear(node: GraphNode, x: Tensor, size: Tensor) -> Tensor:
    out_h, out_w = (int(v) for v in size.tolist())
    align, half = node.attrs.get("align_corners", False), node.attrs.get("half_pixel_centers", False)
    return _resize_axis(_resize_axis(x, 1, out_h, align, half), 2, out_w, align, half)


def op_mean(node: GraphNode, x: Tensor, axes: Tensor) -> Tensor:
    dims = [int(a) % x.dim() for a in axes.reshape(-1).tolist()]
    return x.mean(dim=dims, keepdim=bool(node.attrs.get("keep_dims", False)))


def op_concat(node: GraphNode, *args: Tensor) -> Tensor:
    *tensors, axis = args
    return torch.cat(tensors, dim=int(axis))


def op_reshape(node: GraphNode, x: Tensor, shape: Tensor) -> Tensor:
    return x.reshape([int(v) for v in shape.reshape(-1).tolist()])


def op_topk(node: GraphNode, x: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Top-k along the last axis, largest first; equal values keep the lower index first (as TF)."""
    values, indices = torch.topk(x, int(k), dim=-1, largest=True, sorted=True)
    # torch does not promise an order among equal values: re-sort by (value desc, index asc)
    order = torch.argsort(indices, dim=-1, stable=True)
    values, indices = values.gather(-1, order), indices.gather(-1, order)
    order = torch.argsort(values, dim=-1, descending=True, stable=True)
    return values.gather(-1, order), indices.gather(-1, order).to(torch.int32)


def op_gather(node: GraphNode, params: Tensor, indices: Tensor, axis: Tensor) -> Tensor:
    if int(node.attrs.get("batch_dims", 0)) != 0:
        raise GraphError(f"{node.name}: GatherV2 with batch_dims != 0 is not supported")
    ax = int(axis) % params.dim()
    flat = params.index_select(ax, indices.reshape(-1).long())
    return flat.reshape(list(params.shape[:ax]) + list(indices.shape) + list(params.shape[ax + 1:]))


def op_strided_slice(node: GraphNode, x: Tensor, begin: Tensor, end: Tensor, strides: Tensor) -> Tensor:
    """StridedSlice with begin/end/shrink-axis/new-axis masks (no ellipsis)."""
    if node.attrs.get("ellipsis_mask", 0):
        raise GraphError(f"{node.name}: StridedSlice with an ellipsis mask is not supported")
    begin_mask, end_mask = node.attrs.get("begin_mask", 0), node.attrs.get("end_mask", 0)
    shrink, new_axis = node.attrs.get("shrink_axis_mask", 0), node.attrs.get("new_axis_mask", 0)
    index: list[Any] = []
    for i, (b, e, s) in enumerate(zip(begin.tolist(), end.tolist(), strides.tolist())):
        if new_axis >> i & 1:
            index.append(None)
            continue
        if shrink >> i & 1:
            index.append(int(b))
        else:
            if s < 0:
                raise GraphError(f"{node.name}: negative StridedSlice strides are not supported")
            index.append(slice(None if begin_mask >> i & 1 else int(b), None if end_mask >> i & 1 else int(e),
                               int(s)))
    return x[tuple(index)]


def op_cast(node: GraphNode, x: Tensor) -> Tensor:
    dst = node.attrs["DstT"]
    if dst not in _TF_TYPES:
        raise GraphError(f"{node.name}: Cast to {dst} is not supported")
    return x.to(_TF_TYPES[dst])


def op_expand_dims(node: GraphNode, x: Tensor, axis: Tensor) -> Tensor:
    ax = int(axis)
    return x.unsqueeze(ax if ax >= 0 else x.dim() + 1 + ax)


def op_floor_div(node: GraphNode, a: Tensor, b: Tensor) -> Tensor:
    return torch.div(a, b, rounding_mode="floor")


def op_floor_mod(node: GraphNode, a: Tensor, b: Tensor) -> Tensor:
    return torch.remainder(a, b)  # sign of the divisor, as TF's FloorMod


OPS: dict[str, Callable[..., Tensor | tuple[Tensor, ...]]] = {
    "_FusedConv2D": op_conv2d,
    "Conv2D": op_conv2d,
    "FusedDepthwiseConv2dNative": op_depthwise,
    "DepthwiseConv2dNative": op_depthwise,
    "MaxPool": op_max_pool,
    "ResizeBilinear": op_resize_bilinear,
    "Mean": op_mean,
    "ConcatV2": op_concat,
    "Reshape": op_reshape,
    "TopKV2": op_topk,
    "GatherV2": op_gather,
    "StridedSlice": op_strided_slice,
    "Cast": op_cast,
    "ExpandDims": op_expand_dims,
    "FloorDiv": op_floor_div,
    "FloorMod": op_floor_mod,
    "Add": lambda node, a, b: a + b,
    "AddV2": lambda node, a, b: a + b,
    "Sub": lambda node, a, b: a - b,
    "Mul": lambda node, a, b: a * b,
    "Equal": lambda node, a, b: a == b,
    "Relu": lambda node, x: torch.relu(x),
    "Relu6": lambda node, x: x.clamp(0.0, 6.0),
    "Sigmoid": lambda node, x: torch.sigmoid(x),
    "Identity": lambda node, x: x,
}
_SOURCE_OPS = ("Const", "Placeholder")
_CONV_OPS = ("Conv2D", "_FusedConv2D", "DepthwiseConv2dNative", "FusedDepthwiseConv2dNative")


def read_weights(manifest: list[dict], folder: Path) -> dict[str, Tensor]:
    """Decode the weight files of a tfjs manifest (float16/uint8/uint16 quantisation dequantised)."""
    tensors: dict[str, Tensor] = {}
    for group in manifest:
        blobs = []
        for rel in group["paths"]:
            path = folder / rel
            try:
                blobs.append(path.read_bytes())
            except OSError as err:
                raise GraphError(f"weight file {path} cannot be read: {err.strerror or err}") from err
        data = b"".join(blobs)
        offset = 0
        for spec in group["weights"]:
            count = int(np.prod(spec["shape"], dtype=np.int64))
            quant = spec.get("quantization")
            if quant is not None:
                stored = _QUANT_DTYPES.get(quant["dtype"])
                if stored is None:
                    raise GraphError(f"{spec['name']}: unsupported quantisation {quant['dtype']!r}")
            else:
                stored = _NUMPY_DTYPES.get(spec["dtype"])
                if stored is None:
                    raise GraphError(f"{spec['name']}: unsupported weight dtype {spec['dtype']!r}")
            nbytes = count * np.dtype(stored).itemsize
            if offset + nbytes > len(data):
                raise GraphError(f"weight data in {folder} ends early at {spec['name']!r} (truncated file?)")
            arr = np.frombuffer(data, dtype=stored, count=count, offset=offset)
            offset += nbytes
            if quant is not None and quant["dtype"] != "float16":
                arr = arr.astype(np.float32) * float(quant["scale"]) + float(quant["min"])
            arr = arr.astype(_NUMPY_DTYPES[spec["dtype"]]).reshape(spec["shape"])
            tensors[spec["name"]] = torch.from_numpy(arr.copy())
        if offset != len(data):
            raise GraphError(f"weight data in {folder} has {len(data) - offset} unexpected extra bytes")
    return tensors


class TfjsGraph:
    """A loaded tfjs graph model: ``run(feeds, outputs)`` evaluates only the nodes the outputs need.

    ``feeds`` may name any node, not just placeholders: feeding an intermediate tensor runs only
    the part of the graph after it (used to run the convolutional trunk batched and the batch-1
    decoding tail per image).
    """

    def __init__(self, nodes: list[GraphNode], weights: dict[str, Tensor], signature: dict | None = None):
        self.nodes = {n.name: n for n in nodes}
        self.weights = weights
        self.signature = signature or {}
        unsupported = sorted({n.op for n in nodes if n.op not in OPS and n.op not in _SOURCE_OPS})
        if unsupported:
            raise GraphError(f"graph uses ops this executor does not implement: {unsupported}")
        missing = [n.name for n in nodes if n.op == "Const" and n.name not in weights]
        if missing:
            raise GraphError(f"graph constants without weight data: {missing[:5]}")
        self._plans: dict[tuple[tuple[str, ...], tuple[str, ...]], list[GraphNode]] = {}
        # filters converted to torch layout once, keyed by the consuming node
        self._filters = {n.name: torch_filter(n.op, weights[_split_input(n.inputs[1])[0]])
                         for n in nodes if n.op in _CONV_OPS and _split_input(n.inputs[1])[0] in weights}

    @classmethod
    def load(cls, model_json: Path) -> TfjsGraph:
        model_json = Path(model_json)
        try:
            spec = json.loads(model_json.read_text(encoding="utf-8"))
            topology, manifest = spec["modelTopology"], spec["weightsManifest"]
            raw_nodes = topology["node"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise GraphError(f"{model_json} is not a readable tfjs graph model ({type(err).__name__}: {err})") \
                from err
        nodes = [GraphNode(name=n["name"], op=n["op"],
                           inputs=tuple(i for i in n.get("input", []) if not i.startswith("^")),
                           attrs={k: _decode_attr(v) for k, v in n.get("attr", {}).items()})
                 for n in raw_nodes]
        return cls(nodes, read_weights(manifest, model_json.parent), spec.get("signature"))

    def op_counts(self) -> dict[str, int]:
        """How many nodes of each op the graph holds (constants and placeholders included)."""
        return dict(sorted(Counter(n.op for n in self.nodes.values()).items()))

    def _plan(self, feeds: tuple[str, ...], outputs: tuple[str, ...]) -> list[GraphNode]:
        """Nodes to evaluate, in dependency order, stopping at fed nodes."""
        key = (feeds, outputs)
        if key in self._plans:
            return self._plans[key]
        order: list[GraphNode] = []
        state: dict[str, int] = {}  # 1 = visiting, 2 = done
        for out in outputs:
            stack: list[tuple[str, bool]] = [(_split_input(out)[0], False)]
            while stack:
                name, expanded = stack.pop()
                if state.get(name) == 2:
                    continue
                if name not in self.nodes:
                    raise GraphError(f"graph has no node named {name!r}")
                if expanded:
                    state[name] = 2
                    order.append(self.nodes[name])
                    continue
                if state.get(name) == 1:
                    raise GraphError(f"graph has a cycle through {name!r}")
                state[name] = 1
                stack.append((name, True))
                if name in feeds:
                    continue
                for ref in self.nodes[name].inputs:
                    dep = _split_input(ref)[0]
                    if state.get(dep) != 2:
                        stack.append((dep, False))
        self._plans[key] = order
        return order

    @torch.no_grad()
    def run(self, feeds: dict[str, Tensor], outputs: list[str]) -> list[Tensor]:
        plan = self._plan(tuple(sorted(feeds)), tuple(outputs))
        uses = Counter(_split_input(ref)[0] for node in plan if node.name not in feeds for ref in node.inputs)
        keep = {_split_input(o)[0] for o in outputs}
        values: dict[str, tuple[Tensor, ...]] = {}
        for node in plan:
            if node.name in feeds:
                values[node.name] = (feeds[node.name],)
                continue
            if node.op == "Const":
                values[node.name] = (self.weights[node.name],)
                continue
            if node.op == "Placeholder":
                raise GraphError(f"graph input {node.name!r} was not fed")
            args = []
            for ref in node.inputs:
                name, index = _split_input(ref)
                args.append(values[name][index])
            if node.op in _CONV_OPS:
                args[1] = self._filters[node.name] if node.name in self._filters else torch_filter(node.op, args[1])
            result = OPS[node.op](node, *args)
            values[node.name] = result if isinstance(result, tuple) else (result,)
            for ref in node.inputs:  # free activations as soon as their last consumer ran
                name = _split_input(ref)[0]
                uses[name] -= 1
                if uses[name] == 0 and name not in keep and self.nodes[name].op != "Const":
                    values.pop(name, None)
        out = []
        for ref in outputs:
            name, index = _split_input(ref)
            out.append(values[name][index])
        return out
