"""The transformers backend on tiny random-initialised detectors built from configs and saved to a temporary
folder (no download anywhere): a closed-set YOLOS and a zero-shot OWL-ViT with a vocabulary file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from muvla.regions.hf_detector import HFDetector, default_vocabulary_path, read_vocabulary
from muvla.regions.stage import RegionsConfig, run_regions
from muvla.utils.config import ConfigError

os.environ.setdefault("MUVLA_NO_PROGRESS", "1")


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from transformers import (
        CLIPTokenizer,
        OwlViTConfig,
        OwlViTForObjectDetection,
        OwlViTProcessor,
        YolosConfig,
        YolosForObjectDetection,
    )
    from transformers.models.owlvit import OwlViTImageProcessorPil
    from transformers.models.yolos import YolosImageProcessorPil

    root = tmp_path_factory.mktemp("tiny_detectors")
    torch.manual_seed(0)
    labels = {0: "cat", 1: "dining_table", 2: "tv"}
    yolos = YolosForObjectDetection(YolosConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=[64, 64],
        patch_size=16, num_detection_tokens=8, num_labels=3, id2label=labels,
        label2id={v: k for k, v in labels.items()}))
    yolos.save_pretrained(root / "yolos")
    YolosImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(root / "yolos")

    # a character-level CLIP tokenizer: pad "!" is id 0 like CLIP's, so OWL's query mask (first id > 0) works
    vocab = {"!": 0}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (root / "tok").mkdir()
    (root / "tok" / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (root / "tok" / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(root / "tok" / "vocab.json"), str(root / "tok" / "merges.txt"), pad_token="!")
    owl = OwlViTForObjectDetection(OwlViTConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "pad_token_id": 0,
                     "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"]},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 64, "patch_size": 16},
        projection_dim=32))
    owl.save_pretrained(root / "owl")
    image_processor = OwlViTImageProcessorPil(size={"height": 64, "width": 64}, crop_size={"height": 64, "width": 64})
    OwlViTProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root / "owl")
    # Grounding DINO: tiny Swin backbone + tiny BERT text encoder (two decoder layers: one breaks weight tying)
    from transformers import (
        BertConfig,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SwinConfig,
    )
    from transformers.models.grounding_dino import GroundingDinoImageProcessorPil

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "cat", "dog", "tv", "table"]
    (root / "gd").mkdir()
    (root / "gd" / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    gd = GroundingDinoForObjectDetection(GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                                   image_size=64, out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, num_feature_levels=4, encoder_n_points=2,
        decoder_n_points=2, use_timm_backbone=False, use_pretrained_backbone=False))
    gd.save_pretrained(root / "gd")
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 128, "longest_edge": 128}),
                           tokenizer=BertTokenizerFast(vocab_file=str(root / "gd" / "vocab.txt"))
                           ).save_pretrained(root / "gd")
    return {"yolos": root / "yolos", "owl": root / "owl", "gd": root / "gd"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf_images")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(48, 80), (60, 40), (64, 64)]):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    (folder / "zz_broken.jpg").write_bytes(b"not an image")
    return folder


def test_closed_set_detector_boxes_are_in_image_pixels(tiny_models):
    detector = HFDetector(str(tiny_models["yolos"]), device="cpu", min_score=0.0)
    assert detector.classes == ["cat", "dining_table", "tv"] and not detector.zero_shot
    image = np.zeros((30, 90, 3), dtype=np.uint8)
    (det,) = detector([image])
    assert len(det) == 8  # one prediction per detection token at threshold 0
    assert det.boxes[:, [0, 2]].max() <= 90 + 1e-3 and det.boxes[:, [1, 3]].max() <= 30 + 1e-3
    assert set(det.class_ids.tolist()) <= {0, 1, 2}


def test_zero_shot_vocabulary_is_chunked_without_changing_scores(tiny_models):
    names = ["cat", "dining table", "tv", "dog", "bicycle"]
    image = (np.random.default_rng(1).random((40, 56, 3)) * 255).astype(np.uint8)
    whole = HFDetector(str(tiny_models["owl"]), names, device="cpu", min_score=0.0, chunk_size=10)
    chunked = HFDetector(str(tiny_models["owl"]), names, device="cpu", min_score=0.0, chunk_size=2)
    assert [len(n) for _, n in chunked.chunks()] == [2, 2, 1]
    (a,), (b,) = whole([image]), chunked([image])
    patches = len(a)  # OWL predicts one box per image patch; each chunk returns every patch once
    assert len(b) == 3 * patches
    np.testing.assert_allclose(b.boxes.reshape(3, patches, 4)[0], a.boxes, atol=1e-4)
    # OWL scores each class independently: the best class per box is the same however the vocabulary is split
    per_chunk = b.scores.reshape(3, patches)
    np.testing.assert_allclose(per_chunk.max(axis=0), a.scores, rtol=1e-5)
    ids = b.class_ids.reshape(3, patches)  # chunk labels are offset into the whole vocabulary
    assert set(ids[0]) <= {0, 1} and set(ids[1]) <= {2, 3} and set(ids[2]) == {4}


def test_grounding_dino_scores_a_class_by_its_phrase_tokens(tiny_models, monkeypatch):
    import muvla.regions.hf_detector as hf

    names = ["cat", "dog", "dining table", "tv"]
    image = (np.random.default_rng(2).random((40, 70, 3)) * 255).astype(np.uint8)
    detector = HFDetector(str(tiny_models["gd"]), names, device="cpu", min_score=0.0)
    assert detector.chunks() == [(0, names)]
    (det,) = detector([image])
    assert len(det) == 10 and set(det.class_ids.tolist()) <= set(range(4))
    assert (det.boxes[:, [0, 2]] > -1).all() and (det.boxes[:, [0, 2]] < 71).all()
    # independent recomputation from the raw model outputs: score = best token probability within the phrase
    prompt = "cat . dog . dining table . tv ."
    inputs = detector.processor(images=[Image.fromarray(image)], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        probs = detector.model(**inputs).logits.sigmoid()[0]
    token_spans = {"cat": [1], "dog": [3], "dining table": [5, 6], "tv": [8]}  # [CLS] cat . dog . dining table . tv .
    per_class = torch.stack([probs[:, token_spans[n]].amax(dim=-1) for n in names], dim=-1)
    np.testing.assert_allclose(det.scores, per_class.max(dim=-1).values.numpy(), rtol=1e-5)
    # a long vocabulary is split by the model's text-token budget; labels stay global
    monkeypatch.setattr(hf, "GROUNDING_MAX_TOKENS", 5)
    chunks = detector.chunks()
    assert chunks == [(0, ["cat", "dog"]), (2, ["dining table", "tv"])]  # 2 + 2 tokens, then 3 + 2
    (split,) = detector([image])
    assert len(split) == 20 and set(split.class_ids.tolist()) <= set(range(4))


def test_vocabulary_files(tmp_path):
    default = read_vocabulary(None)
    assert len(default) > 1000 and "person" in default and "white" not in default and "bad sentence" not in default
    assert default_vocabulary_path().is_file()
    path = tmp_path / "vocab.txt"
    path.write_text("# my classes\ncat\n\n  dining   table \ncat\n", encoding="utf-8")
    assert read_vocabulary(path) == ["cat", "dining table"]
    path.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no class names"):
        read_vocabulary(path)


@pytest.mark.parametrize("which", ["yolos", "owl"])
def test_regions_stage_with_a_transformers_detector(tiny_models, images, tmp_path, which):
    from muvla.corpus.region_store import RegionStore

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("cat\ndining_table\ntv\n", encoding="utf-8")
    extra = {"vocabulary": vocab} if which == "owl" else {}
    cfg = RegionsConfig(out=tmp_path / "r", backend="transformers", images=images, detector_model=str(tiny_models[which]),
                        min_score=0.0, max_regions=5, device="cpu", detector_batch_size=2, unit_size=2,
                        num_threads=1, progress=False, crop_size=32, **extra)
    summary = run_regions(cfg)
    assert summary["images_written"] == 3 and summary["rejected"] == 1
    store = RegionStore(tmp_path / "r")
    assert store.classes[:3] == ["cat", "dining_table", "tv"]
    for image in store:
        assert 2 <= image.num_regions <= 5 and image.boxes[0].tolist() == [0, 0, image.width, image.height]
        assert (np.diff(image.scores[1:]) <= 0).all()  # detections by score, after NMS, merging and the cap
        assert set(image.tags[1:]) <= {"cat", "table", "tv"}  # caption words: "dining_table" -> "table"
        assert (image.class_ids[1:] < 3).all()
    assert run_regions(cfg)["parts_written_now"] == 0  # resumable like the other backends


def test_bad_model_folder_and_misused_vocabulary_are_one_config_error(tiny_models, images, tmp_path):
    with pytest.raises(ConfigError, match="cannot load detector"):
        run_regions(RegionsConfig(out=tmp_path / "a", backend="transformers", images=images,
                                  detector_model=str(tmp_path / "missing"), progress=False))
    vocab = tmp_path / "v.txt"
    vocab.write_text("cat\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="only applies to zero-shot"):
        run_regions(RegionsConfig(out=tmp_path / "b", backend="transformers", images=images,
                                  detector_model=str(tiny_models["yolos"]), vocabulary=vocab, device="cpu",
                                  progress=False))
    with pytest.raises(ConfigError, match="needs --detector-model"):
        RegionsConfig(out=tmp_path / "c", backend="transformers", images=images).validate()
