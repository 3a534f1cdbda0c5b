"""The encoder/classifier split (tta.models.split): classifier(encoder(x)) == model(x) for every family."""
import pytest
import torch
from torch import nn

import tta
from tta.errors import ConfigError
from tta.models import split
from tta.models.common import IMAGENET_MEAN, IMAGENET_STD, Normalized


def _torchvision_vit():
    from torchvision.models import VisionTransformer
    return Normalized(VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                                        mlp_dim=32, num_classes=10), IMAGENET_MEAN, IMAGENET_STD)


def _robustbench_wrn():
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet
    return WideResNet(depth=10, widen_factor=1, num_classes=10)


def _robustbench_resnext():
    from robustbench.model_zoo.architectures.resnext import CifarResNeXt, ResNeXtBottleneck
    return CifarResNeXt(ResNeXtBottleneck, depth=11, cardinality=2, base_width=4, num_classes=10)


def _openclip():
    from clip_helpers import tiny_clip
    return tiny_clip()


FAMILIES = {  # family: (builder, expected feature width)
    "cifar_resnet": (lambda: tta.models.load("cifar_resnet20", checkpoint="none"), 64),
    "torchvision_resnet": (lambda: tta.models.load("torchvision:resnet18", weights=None, num_classes=10), 512),
    "torchvision_vit": (_torchvision_vit, 16),
    "timm_vit": (lambda: tta.models.load("timm:vit_tiny_patch16_224", pretrained=False, num_classes=10), 192),
    "timm_resnet": (lambda: tta.models.load("timm:resnet18", pretrained=False, num_classes=10), 512),
    "robustbench_wrn": (_robustbench_wrn, 64),
    "robustbench_resnext": (_robustbench_resnext, 1024),
    "openclip": (_openclip, 64),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_classifier_of_encoder_is_the_model(family):
    if family == "robustbench_wrn" or family == "robustbench_resnext":
        from tta.models.robustbench import import_robustbench
        import_robustbench()
    build, width = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    size = 224 if family == "timm_vit" else 32
    x = torch.rand(3, 3, size, size)
    encoder, classifier = split(model)
    with torch.no_grad():
        expected = model(x)
        features = encoder(x)
        assert features.shape == (3, width)
        torch.testing.assert_close(classifier(features), expected, rtol=0, atol=0)
        f2, logits = encoder.with_logits(x)
        assert torch.equal(f2, features) and torch.equal(logits, expected)


def test_classifier_is_the_models_own_module():
    model = tta.models.load("cifar_resnet20", checkpoint="none")
    encoder, classifier = split(model)
    assert classifier is model.net.linear
    assert not list(encoder.state_dict())  # the model is not registered twice


def test_unknown_layout_is_one_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(ConfigError, match="no timm classifier and no final layer named"):
        split(model)


def test_a_layer_that_is_not_last_is_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.fc = nn.Flatten(), nn.Linear(12, 10)

        def forward(self, x):
            return self.fc(self.body(x)) * 2  # something follows the classifier

    encoder, _ = split(Odd())
    with pytest.raises(ConfigError, match="not the output of its last layer 'fc'"):
        encoder(torch.rand(2, 3, 2, 2))
