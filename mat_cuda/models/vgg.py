"""VGGNet: a small VGG-style CNN for image classification, in plain PyTorch."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class VGGNet(nn.Module):
    """VGG-style CNN: stages of (conv3x3 + ReLU) × convs_per_stage then 2x2 max-pool, then a
    classifier fc1 (Linear, ReLU) and fc2 (Linear -> num_classes).

    Module tree: stages[s] (nn.Sequential of Conv2d, [BatchNorm2d], ReLU ..., MaxPool2d),
    classifier.fc1, classifier.fc2.

    batch_norm=False by default: in training mode BatchNorm normalises with batch statistics, so
    a sample's output (and its gradient) depends on the other samples of the batch, and MAT's
    per-sample gradients and Grams would no longer be those of independent samples. Use True
    only where that does not matter.

    forward(x (n, in_channels, image_size, image_size) float) -> logits (n, num_classes).
    image_size must be divisible by 2**len(widths).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, widths: Sequence[int] = (32, 64, 128),
                 image_size: int = 32, batch_norm: bool = False, convs_per_stage: int = 2, fc_hidden: int = 256):
        super().__init__()
        if image_size % (2 ** len(widths)) != 0:
            raise ValueError(f"image_size {image_size} must be divisible by 2**len(widths) = {2 ** len(widths)}")
        self.config = dict(in_channels=in_channels, num_classes=num_classes, widths=tuple(widths),
                           image_size=image_size, batch_norm=batch_norm, convs_per_stage=convs_per_stage,
                           fc_hidden=fc_hidden)
        stages, c = [], in_channels
        for w in widths:
            layers: list[nn.Module] = []
            for _ in range(convs_per_stage):
                layers.append(nn.Conv2d(c, w, kernel_size=3, padding=1))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(w))
                layers.append(nn.ReLU())
                c = w
            layers.append(nn.MaxPool2d(2))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        side = image_size // 2 ** len(widths)
        self.classifier = nn.ModuleDict({"fc1": nn.Linear(c * side * side, fc_hidden),
                                         "fc2": nn.Linear(fc_hidden, num_classes)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        h = torch.relu(self.classifier["fc1"](x.flatten(1)))
        return self.classifier["fc2"](h)
