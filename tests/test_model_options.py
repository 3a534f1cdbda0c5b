"""Model options: a new model name in a config or an override starts without the old model's options,
and an option the chosen family does not take is one clear error listing the ones it does."""
import pytest

import tta
from tta import config
from tta.errors import ConfigError


def test_override_of_the_model_name_drops_the_base_configs_options():
    cfg = config.load("configs/imagenetc/norm.yaml", ["model.name=torchvision:resnet18"])
    assert cfg["model"] == {"name": "torchvision:resnet18", "checkpoint": None, "options": {}}
    cfg = config.load("configs/imagenetc/norm.yaml", ["model.name=torchvision:resnet18",
                                                      "model.options.num_classes=10"])
    assert cfg["model"]["options"] == {"num_classes": 10}
    assert config.load("configs/imagenetc/norm.yaml")["model"]["options"] == {"dataset": "imagenet",
                                                                              "threat_model": "corruptions"}


def test_a_derived_config_with_another_model_starts_clean():
    cfg = config.load("configs/imagenetc/foa.yaml")
    assert cfg["model"] == {"name": "timm:vit_base_patch16_224", "checkpoint": None, "options": {}}


def test_an_option_of_another_family_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"torchvision models do not take the option\(s\) \['dataset'\].*"
                                          r"they take: weights, num_classes, mean, std"):
        tta.models.load("torchvision:resnet18", weights=None, dataset="imagenet")
    with pytest.raises(ConfigError, match="timm models do not take"):
        tta.models.load("timm:resnet18", threat_model="corruptions")
