"""An image classifier served by ddml: ResNet-18 written out by hand (no torchvision needed), its
top 5 classes and their probabilities for one 3x224x224 float32 image.

Two ways to serve it, both with declared tensors (IMAGE FP32 [-1,3,224,224] in; CLASSES INT64
[-1,5] and PROBABILITIES FP32 [-1,5] out), so that the gateway refuses any request that does not fit:

    # 1. exported, without code: write model.pt2 once, then serve the file
    .venv/bin/python -m examples.image_classifier.model model.pt2
    ddml-worker --model resnet --model-path model.pt2 --input IMAGE:FP32:3,224,224 \
                --output CLASSES:INT64:5 --output PROBABILITIES:FP32:5

    # 2. a handler (this module's ImageClassifier), for models that need Python around them
    ddml-worker --model resnet --handler examples.image_classifier.model:ImageClassifier

The weights are random (seeded): load your own with load_state_dict(), e.g. torchvision's.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch import nn

from ddml_common.tensors import TensorSpec, metadata
from worker.models import Manager

TOP = 5
INPUTS = [TensorSpec("IMAGE", "FP32", (3, 224, 224))]
OUTPUTS = [TensorSpec("CLASSES", "INT64", (TOP,), "classes"), TensorSpec("PROBABILITIES", "FP32", (TOP,), "probabilities")]


class Block(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.downsample = (nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))
                           if stride != 1 or inputs != outputs else nn.Identity())

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.downsample(x))


class ResNet18(nn.Module):
    """torchvision's resnet18 layout (its state_dict keys load here), returning the top-5 classes."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        for n, (inputs, outputs, stride) in enumerate(widths, 1):
            setattr(self, f"layer{n}", nn.Sequential(Block(inputs, outputs, stride), Block(outputs, outputs, 1)))
        self.fc = nn.Linear(512, classes)

    def forward(self, image):
        x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(image))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        logits = self.fc(torch.flatten(torch.mean(x, dim=(2, 3), keepdim=True), 1))
        probabilities, classes = torch.softmax(logits, dim=1).topk(TOP, dim=1)
        return classes, probabilities


def build(seed: int = 0) -> ResNet18:
    torch.manual_seed(seed)
    return ResNet18().eval()


def export(path: str) -> None:
    """model.pt2: a torch.export program with a dynamic batch dimension."""
    example = torch.zeros(2, 3, 224, 224)
    program = torch.export.export(build(), (example,), dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},))
    torch.export.save(program, path)


class ImageClassifier(Manager):
    """The same model as a handler: predict() gets one writable float32 array [3,224,224] per input
    (v2 binary or JSON, v1 msgpack `__ndarray__`; a v1 JSON list, which it converts); the gateway has
    already refused any request that does not fit IMAGE."""

    def init_model(self) -> None:
        self.model = build().to(self.device)

    def metadata(self) -> dict:
        return metadata(INPUTS, OUTPUTS, "pytorch")

    def warmup(self) -> None:
        self.predict([np.zeros((3, 224, 224), np.float32)])

    def predict(self, batch: list) -> list:
        images = torch.from_numpy(np.stack([np.asarray(image, np.float32) for image in batch])).to(self.device)
        with torch.inference_mode():
            classes, probabilities = self.model(images)
        classes, probabilities = classes.cpu().numpy(), probabilities.cpu().numpy()
        return [{"classes": c, "probabilities": p} for c, p in zip(classes, probabilities)]


if __name__ == "__main__":
    export(sys.argv[1] if len(sys.argv) > 1 else "model.pt2")
