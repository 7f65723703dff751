"""The tfjs graph executor: op semantics on tiny hand-made graphs, and the real CenterNet graph against
outputs recorded from TensorFlow.js itself (tests/fixtures/centernet_tfjs_outputs.json)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from muvla.regions.tfjs_graph import GraphError, GraphNode, TfjsGraph, read_weights
from muvla.regions.weights import find_centernet

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "centernet_tfjs_outputs.json"


def _graph(nodes: list[GraphNode], consts: dict[str, np.ndarray]) -> TfjsGraph:
    weights = {k: torch.from_numpy(np.asarray(v)) for k, v in consts.items()}
    const_nodes = [GraphNode(k, "Const", (), {}) for k in consts]
    return TfjsGraph(const_nodes + [GraphNode("x", "Placeholder", (), {})] + nodes, weights)


def test_same_padding_puts_the_extra_pixel_bottom_right():
    # 4x4 input, 2x2 kernel of ones, stride 2, SAME: TF pads 0 before and 0 after (total 0) for
    # even sizes; with a 3x3 kernel the total is 1 and it goes after, so output[0,0] sums rows/cols 0..1.
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    filt = np.ones((3, 3, 1, 1), dtype=np.float32)
    node = GraphNode("conv", "Conv2D", ("x", "f"), {"strides": [1, 2, 2, 1], "padding": "SAME"})
    (y,) = _graph([node], {"f": filt}).run({"x": torch.from_numpy(x)}, ["conv"])
    expected = np.array([[x[0, 0:3, 0:3, 0].sum(), x[0, 0:3, 2:4, 0].sum()],
                         [x[0, 2:4, 0:3, 0].sum(), x[0, 2:4, 2:4, 0].sum()]])
    assert y.shape == (1, 2, 2, 1)
    np.testing.assert_allclose(y[0, :, :, 0].numpy(), expected)


def test_depthwise_with_multiplier_orders_channels_like_tf():
    x = np.random.default_rng(0).normal(size=(1, 5, 5, 2)).astype(np.float32)
    filt = np.random.default_rng(1).normal(size=(3, 3, 2, 2)).astype(np.float32)
    node = GraphNode("dw", "DepthwiseConv2dNative", ("x", "f"), {"strides": [1, 1, 1, 1], "padding": "VALID"})
    (y,) = _graph([node], {"f": filt}).run({"x": torch.from_numpy(x)}, ["dw"])
    # TF: out[..., c * M + m] = sum_{i,j} x[..., i, j, c] * f[i, j, c, m]
    expected = np.zeros((3, 3, 4), dtype=np.float32)
    for c in range(2):
        for m in range(2):
            for r in range(3):
                for s in range(3):
                    expected[r, s, c * 2 + m] = (x[0, r:r + 3, s:s + 3, c] * filt[:, :, c, m]).sum()
    np.testing.assert_allclose(y[0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_legacy_bilinear_resize_and_fused_relu():
    x = np.array([0.0, 10.0], dtype=np.float32).reshape(1, 1, 2, 1)
    nodes = [GraphNode("up", "ResizeBilinear", ("x", "size"), {"align_corners": False, "half_pixel_centers": False}),
             GraphNode("neg", "Mul", ("up", "minus"), {}),
             GraphNode("conv", "_FusedConv2D", ("neg", "f", "b"),
                       {"strides": [1, 1, 1, 1], "padding": "VALID", "fused_ops": ["BiasAdd", "Relu"]})]
    graph = _graph(nodes, {"size": np.array([1, 4], np.int32), "minus": np.float32(-1.0),
                           "f": np.ones((1, 1, 1, 1), np.float32), "b": np.array([5.0], np.float32)})
    up, conv = graph.run({"x": torch.from_numpy(x)}, ["up", "conv"])
    # legacy TF: source = dst * in/out = 0, 0.5, 1, 1.5 (clamped to the last pixel)
    np.testing.assert_allclose(up.reshape(-1).numpy(), [0.0, 5.0, 10.0, 10.0])
    np.testing.assert_allclose(conv.reshape(-1).numpy(), [5.0, 0.0, 0.0, 0.0])


def test_topk_ties_strided_slice_floor_ops_and_gather():
    x = np.array([[1.0, 3.0, 3.0, 2.0, 3.0]], dtype=np.float32)
    nodes = [GraphNode("top", "TopKV2", ("x", "k"), {}),
             GraphNode("div", "FloorDiv", ("top:1", "two"), {}),
             GraphNode("mod", "FloorMod", ("neg", "three"), {}),
             GraphNode("sl", "StridedSlice", ("x", "b", "e", "s"), {"begin_mask": 1, "end_mask": 0,
                                                                     "shrink_axis_mask": 0}),
             GraphNode("g", "GatherV2", ("x", "idx", "axis"), {})]
    graph = _graph(nodes, {"k": np.int32(4), "two": np.int32(2), "three": np.int32(3),
                           "neg": np.array([-4, 4], np.int32), "b": np.array([0, 1], np.int32),
                           "e": np.array([1, 4], np.int32), "s": np.array([1, 2], np.int32),
                           "idx": np.array([4, 0], np.int32), "axis": np.int32(1)})
    values, indices, div, mod, sl, g = graph.run({"x": torch.from_numpy(x)},
                                                 ["top:0", "top:1", "div", "mod", "sl", "g"])
    assert values.tolist() == [[3.0, 3.0, 3.0, 2.0]]
    assert indices.tolist() == [[1, 2, 4, 3]]  # equal values: lower index first, as TensorFlow
    assert div.tolist() == [[0, 1, 2, 1]]
    assert mod.tolist() == [2, 1]  # floor modulo takes the divisor's sign
    assert sl.tolist() == [[3.0, 2.0]]
    assert g.tolist() == [[3.0, 1.0]]


def test_unsupported_op_and_truncated_weights_are_one_clear_error(tmp_path):
    with pytest.raises(GraphError, match="does not implement.*Softmax"):
        TfjsGraph([GraphNode("x", "Placeholder", (), {}), GraphNode("s", "Softmax", ("x",), {})], {})
    (tmp_path / "w.bin").write_bytes(np.zeros(3, np.float32).tobytes())
    manifest = [{"paths": ["w.bin"], "weights": [{"name": "a", "shape": [2, 2], "dtype": "float32"}]}]
    with pytest.raises(GraphError, match="ends early"):
        read_weights(manifest, tmp_path)
    half = [{"paths": ["w.bin"], "weights": [{"name": "a", "shape": [6], "dtype": "float32",
                                              "quantization": {"dtype": "float16"}}]}]
    (tmp_path / "w.bin").write_bytes(np.arange(6, dtype=np.float16).tobytes())
    assert read_weights(half, tmp_path)["a"].dtype == torch.float32


def test_bad_model_json_is_one_clear_error(tmp_path):
    (tmp_path / "model.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(GraphError, match="not a readable tfjs graph model"):
        TfjsGraph.load(tmp_path / "model.json")


# ------------------------------------------------------------------ the real graph vs TensorFlow.js

def _sample(name: str) -> np.ndarray:
    import skimage.data

    return skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()


@pytest.fixture(scope="module")
def centernet_graph():
    folder = find_centernet()
    if folder is None:
        pytest.skip("CenterNet weights not in the cache (python -m muvla.regions.weights fetches them)")
    return TfjsGraph.load(folder / "centernet.json")


def test_graph_uses_the_recorded_ops(centernet_graph):
    fixture = json.loads(FIXTURE.read_text(encoding="utf-8"))
    assert centernet_graph.op_counts() == fixture["graph_ops"]


@pytest.mark.slow
def test_executor_matches_tensorflow_js(centernet_graph):
    from muvla.regions.centernet import letterbox

    fixture = json.loads(FIXTURE.read_text(encoding="utf-8"))
    torch.set_num_threads(1)
    for entry in fixture["images"]:
        image = _sample(entry["name"])
        if hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest() != entry["image_sha256"]:
            pytest.skip(f"scikit-image sample {entry['name']!r} differs from the one recorded")
        canvas, _ = letterbox(image)
        assert hashlib.sha256(canvas.numpy().astype("<f4").tobytes()).hexdigest() == entry["canvas_sha256"], \
            f"letterbox of {entry['name']} changed: regenerate the fixture (tests/fixtures/make_...py)"
        kp, wh, det = centernet_graph.run({"tower_0/images": canvas[None]},
                                          ["tower_0/keypoints", "tower_0/wh", "tower_0/detections"])
        ref = np.array(entry["detections_top"], dtype=np.float32)
        ours = det[0, :len(ref)].numpy()
        np.testing.assert_array_equal(ours[:, 5], ref[:, 5])
        np.testing.assert_allclose(ours[:, 4], ref[:, 4], atol=2e-5)
        np.testing.assert_allclose(ours[:, :4], ref[:, :4], atol=5e-3)
        assert float(kp.sum()) == pytest.approx(entry["keypoints_sum"], rel=1e-5)
        assert float(wh.abs().sum()) == pytest.approx(entry["wh_abs_sum"], rel=1e-5)
