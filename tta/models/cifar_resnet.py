"""CIFAR ResNet-20/32/44/56 (He et al. 2016) with option-A (parameter-free) shortcuts.

Matches the layout of the akamaster checkpoints (see shared/data/SOURCES.md): conv3x3(3→16)+BN+ReLU,
three stages of n BasicBlocks (16/32/64 channels, strides 1/2/2), global average pooling, Linear(64→10).
The option-A shortcut subsamples by 2 and zero-pads the new channels, so it has no weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9}
CHECKPOINTS = {
    20: "resnet20-12fca82f.th",
    32: "resnet32-d509ac18.th",
    44: "resnet44-014dd654.th",
    56: "resnet56-4bfd9763.th",
}
CHECKPOINT_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/{}"


class PadShortcut(nn.Module):
    """Option-A shortcut: stride-2 subsampling plus zero channels on both sides."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = PadShortcut(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"CIFAR ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
        n = DEPTHS[depth]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def load_state(path) -> dict:
    """Read an akamaster checkpoint: the state dict sits under ``state_dict`` with ``module.`` prefixes."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    state = blob.get("state_dict", blob)
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
