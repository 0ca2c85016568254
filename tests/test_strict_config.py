"""One strict loader reads the three kinds of config: pretraining recipes, fine-tuning recipes and model configs."""

from __future__ import annotations

import pytest

from onepeace.config import OnePeaceConfig
from onepeace.finetune.config import parse_finetune_recipe
from onepeace.modality import Modality
from onepeace.train.config import parse_recipe
from onepeace.variants import get_variant


def test_model_config_round_trips_through_the_strict_loader() -> None:
    cfg = get_variant("onepeace-tiny").replace(modalities=(Modality.TEXT, Modality.AUDIO), image_size=64)
    back = OnePeaceConfig.from_dict(cfg.to_dict())
    assert back == cfg and back.modalities == (Modality.TEXT, Modality.AUDIO)
    assert back.audio.feature_layers == cfg.audio.feature_layers and isinstance(back.audio.feature_layers[0], tuple)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"text": {"wings": 2}}, "unknown key 'config.text.wings'; allowed keys: bucket_size"),
        ({"layers": "40"}, "config.layers must be an integer, got '40'"),
        (
            {"modalities": ["text", "smell"]},
            "config.modalities[1] must be one of 'text', 'image', 'audio'; got 'smell'",
        ),
        ({"heads": 5}, "config: embed_dim 64 is not divisible by heads 5"),
    ],
)
def test_model_config_errors_name_the_dotted_key(change: dict, message: str) -> None:
    data = {**get_variant("onepeace-tiny").to_dict(), **change}
    with pytest.raises(ValueError) as info:
        OnePeaceConfig.from_dict(data)
    assert message in str(info.value)


def test_recipes_of_both_kinds_report_unknown_keys_alike() -> None:
    with pytest.raises(ValueError, match=r"unknown key 'optim\.lrr'; allowed keys: "):
        parse_recipe("optim: {total_updates: 3, lrr: 0.1}")
    with pytest.raises(ValueError, match=r"unknown key 'optim\.lrr'; allowed keys: "):
        parse_finetune_recipe("task: imagenet\noptim: {total_updates: 3, lrr: 0.1}")
    with pytest.raises(ValueError, match="the top level must be a mapping"):
        parse_finetune_recipe("- task")
