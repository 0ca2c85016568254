"""The one place that knows the official ONE-PEACE state-dict key names (spec §9.2-9.4).

Each rule pairs an official key pattern with the key of :class:`onepeace.model.OnePeaceModel`. Placeholders:
``{m}`` modality, ``{i}``/``{j}``/``{c}`` integers, ``{p+1}`` an integer that is one larger in the official name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


def _fusion_rules(official: str, ours: str) -> tuple[tuple[str, str], ...]:
    """Rules of one fusion stack: ``official`` (``*_wrapper.fusion_model``) -> ``ours`` (an ``encoder`` module)."""
    layer, mine = official + ".layers.{i}", ours + ".layers.{i}"
    ffn = layer + ".{m}_ffn"
    return (
        (layer + ".self_attn.{proj}.{w}", mine + ".attn.{proj}.{w}"),
        (layer + ".self_attn.ln.{w}", mine + ".attn.sub_norm.{w}"),
        (layer + ".self_attn_layer_norm.{w}", mine + ".attn_norm.{w}"),
        (layer + ".final_layer_norm.{w}", mine + ".ffn_norm.{w}"),
        (layer + ".gamma_1", mine + ".gamma_attn"),
        (layer + ".gamma_2", mine + ".gamma_ffn"),
        (ffn + ".0.wi_0.weight", mine + ".ffn.{m}.gate.weight"),
        (ffn + ".0.wi_1.weight", mine + ".ffn.{m}.linear.weight"),
        (ffn + ".2.{w}", mine + ".ffn.{m}.norm.{w}"),
        (ffn + ".3.{w}", mine + ".ffn.{m}.out.{w}"),
        (official + ".{m}_layer_norm.{w}", ours + ".final_norms.{m}.{w}"),
    )


RULES: tuple[tuple[str, str], ...] = (
    ("logit_scale", "logit_scale"),
    ("{m}_proj.{w}", "projections.{m}.{w}"),
    ("encoder_wrapper.{m}_adapter.rel_pos_table_list.{j}.weight", "adapters.{m}.rel_pos.tables.{j}.weight"),
    ("encoder_wrapper.{m}_adapter.rel_pos_table.weight", "adapters.{m}.rel_pos.tables.0.weight"),
    ("encoder_wrapper.{m}_adapter.cls_embedding", "adapters.{m}.cls_token"),
    ("encoder_wrapper.text_adapter.embed_tokens.weight", "adapters.text.token_embed.weight"),
    ("encoder_wrapper.text_adapter.embed_positions.weight", "adapters.text.pos_embed.weight"),
    ("encoder_wrapper.image_adapter.pos_embed", "adapters.image.pos_embed"),
    ("encoder_wrapper.image_adapter.embed_images.0.{w}", "adapters.image.stem.conv1.{w}"),
    ("encoder_wrapper.image_adapter.embed_images.1.layer_norm.{w}", "adapters.image.stem.norm1.{w}"),
    ("encoder_wrapper.image_adapter.embed_images.3.{w}", "adapters.image.stem.conv2.{w}"),
    ("encoder_wrapper.image_adapter.embed_images.4.layer_norm.{w}", "adapters.image.stem.norm2.{w}"),
    ("encoder_wrapper.image_adapter.embed_images.6.{w}", "adapters.image.stem.conv3.{w}"),
    (
        "encoder_wrapper.audio_adapter.embed_audios.0.conv_layers.{c}.0.weight",
        "adapters.audio.extractor.{c}.conv.weight",
    ),
    (
        "encoder_wrapper.audio_adapter.embed_audios.0.conv_layers.{c}.2.1.{w}",
        "adapters.audio.extractor.{c}.norm.{w}",
    ),
    ("encoder_wrapper.audio_adapter.embed_audios.2.{w}", "adapters.audio.feature_norm.{w}"),
    ("encoder_wrapper.audio_adapter.embed_audios.3.{w}", "adapters.audio.feature_proj.{w}"),
    ("encoder_wrapper.audio_adapter.embed_positions.{p+1}.0.{w}", "adapters.audio.conv_pos.{p}.conv.{w}"),
    ("encoder_wrapper.audio_adapter.cls_pos_embed", "adapters.audio.cls_pos"),
    ("encoder_wrapper.audio_adapter.mask_embedding", "adapters.audio.mask_embedding"),
)

#: The pretraining decoder (spec §9.3); ours lives in :class:`onepeace.model.decoder.PretrainDecoder`.
DECODER_RULES: tuple[tuple[str, str], ...] = (
    ("decoder_{m}_embed.{w}", "decoder.embed_in.{m}.{w}"),
    ("{m}_mask_token", "decoder.mask_tokens.{m}"),
    ("{m}_mask_head.{w}", "decoder.heads.{m}.{w}"),
    ("decoder_wrapper.text_adapter.embed_positions.weight", "decoder.positions.text"),
    ("decoder_wrapper.image_adapter.pos_embed", "decoder.positions.image"),
    ("decoder_wrapper.audio_adapter.embed_positions.weight", "decoder.positions.audio"),
    *_fusion_rules("decoder_wrapper.fusion_model", "decoder.encoder"),
)

#: The classification head of fine-tuned files (spec §9.2); ours is :class:`onepeace.heads.ClassifyHead`.
HEAD_RULES: tuple[tuple[str, str], ...] = (
    ("classify_head.attn_pooling_func.q", "head.attn_pooling_func.q"),
    ("classify_head.attn_pooling_func.{proj}.{w}", "head.attn_pooling_func.{proj}.{w}"),
    ("classify_head.norm.{w}", "head.norm.{w}"),
    ("classify_head.pooler.1.{w}", "head.pooler.1.{w}"),
    ("classify_head.classifier.{c}.{w}", "head.classifier.{c}.{w}"),
    ("encoder_wrapper.text_adapter.type_embedding", "type_embeddings.text"),
    ("encoder_wrapper.image_adapter.type_embedding", "type_embeddings.image"),
    ("encoder_wrapper.image_adapter.type_embedding_2", "type_embeddings.image_2"),
)
"""Also the NLVR2 type embeddings, which :class:`onepeace.finetune.model.TaskModel` holds beside the head."""

RULES = RULES + _fusion_rules("encoder_wrapper.fusion_model", "encoder") + DECODER_RULES + HEAD_RULES

#: Parameters the official model holds but never reads; they are dropped on load.
DEAD = re.compile(r"^decoder_wrapper\.(text|image|audio)_adapter\.(cls_embedding|mask_embedding)$")

#: Recomputable buffers present in official files; they carry no learned state.
BUFFER_SUFFIXES: tuple[str, ...] = (".rp_bucket", ".position_idx", ".version")

_PLACEHOLDER = {
    "m": r"(?P<m>text|image|audio)",
    "w": r"(?P<w>weight|bias)",
    "proj": r"(?P<proj>q_proj|k_proj|v_proj|out_proj)",
}


def _compile(pattern: str) -> tuple[re.Pattern[str], frozenset[str]]:
    """Regex for a key pattern, and the names of its ``{x+1}`` placeholders."""
    parts = re.split(r"(\{[a-z]+(?:\+1)?\})", pattern)
    out, shifted = [], set()
    for part in parts:
        if part.startswith("{"):
            name = part[1:-1].removesuffix("+1")
            if part.endswith("+1}"):
                shifted.add(name)
            out.append(_PLACEHOLDER.get(name, rf"(?P<{name}>\d+)"))
        else:
            out.append(re.escape(part))
    return re.compile("^" + "".join(out) + "$"), frozenset(shifted)


def _fill(template: str, values: dict[str, str]) -> str:
    def sub(match: re.Match[str]) -> str:
        value = values[match.group(1)]
        return str(int(value) + 1) if match.group(2) else value

    return re.sub(r"\{([a-z]+)(\+1)?\}", sub, template)


def _rules(pairs: list[tuple[str, str]]) -> list[tuple[re.Pattern[str], frozenset[str], str]]:
    return [(*_compile(src), dst) for src, dst in pairs]


_TO_OURS = _rules([(src, dst) for src, dst in RULES])
_TO_OFFICIAL = _rules([(dst, src) for src, dst in RULES])


def to_ours(key: str) -> str | None:
    """Our key for an official key, or None when no rule matches."""
    return _translate(key, _TO_OURS)


def to_official(key: str) -> str | None:
    """The official key for one of ours, or None when no rule matches."""
    return _translate(key, _TO_OFFICIAL)


def _translate(key: str, rules: list[tuple[re.Pattern[str], frozenset[str], str]]) -> str | None:
    for regex, shifted, template in rules:
        match = regex.match(key)
        if match:
            values = {k: (str(int(v) - 1) if k in shifted else v) for k, v in match.groupdict().items()}
            return _fill(template, values)
    return None


@dataclass
class KeyReport:
    """How an official state dict's keys were sorted (official key -> our key where one exists)."""

    mapped: dict[str, str] = field(default_factory=dict)
    decoder: dict[str, str] = field(default_factory=dict)
    head: dict[str, str] = field(default_factory=dict)
    buffers: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    @property
    def pretrain_only(self) -> list[str]:
        """Official keys that only the pretraining model uses (the decoder and its dead parameters)."""
        return sorted(self.decoder) + self.dead


def sort_keys(keys: list[str]) -> KeyReport:
    """File each official key as a backbone, decoder or classification-head key, a buffer, a dead parameter or an
    unknown key."""
    report = KeyReport()
    for key in keys:
        if key.endswith(BUFFER_SUFFIXES):
            report.buffers.append(key)
        elif DEAD.match(key):
            report.dead.append(key)
        elif (ours := to_ours(key)) is None:
            report.unknown.append(key)
        elif ours.startswith("decoder."):
            report.decoder[key] = ours
        elif ours.startswith(("head.", "type_embeddings.")):
            report.head[key] = ours
        else:
            report.mapped[key] = ours
    return report
