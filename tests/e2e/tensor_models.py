"""Handlers with declared tensors, served by real workers in tests/e2e/test_declared_tensors.py
(`--handler tests.e2e.tensor_models:ImageModel`; the worker runs with the repository as its cwd)."""

from __future__ import annotations

import numpy as np

from ddml_common.tensors import TensorSpec, metadata
from worker.models import Manager

IMAGE = TensorSpec("IMAGE", "FP32", (3, 8, 8))
OUTPUTS = [TensorSpec("CLASSES", "INT64", (2,), "classes"), TensorSpec("PROBABILITIES", "FP32", (2,), "probabilities")]


def classify(image: np.ndarray) -> dict:
    """What the model computes for one image, in-process: the two brightest channels, softmaxed."""
    means = image.reshape(3, -1).mean(axis=1, dtype=np.float32)
    order = np.argsort(-means, kind="stable")[:2]
    top = np.exp(means[order] - means[order].max())
    return {"classes": order.astype(np.int64), "probabilities": (top / top.sum()).astype(np.float32)}


class ImageModel(Manager):
    def metadata(self) -> dict:
        return metadata([IMAGE], OUTPUTS, "python")

    def predict(self, batch: list) -> list:
        return [classify(np.asarray(image)) for image in batch]


class CastModel(ImageModel):
    """Returns float class scores where CLASSES INT64 is declared: must never reach a client as ints."""

    def predict(self, batch: list) -> list:
        return [{"classes": np.asarray(image).reshape(-1)[:2].astype(np.float32),
                 "probabilities": np.zeros(2, np.float32)} for image in batch]


class WrongCountModel(ImageModel):
    """Returns one output whatever the batch: a fault of the whole call."""

    def predict(self, batch: list) -> list:
        return [classify(np.asarray(batch[0]))]
