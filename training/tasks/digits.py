"""The built-in `digits` task: a small MLP on scikit-learn's bundled 8x8 handwritten digits (1,797 images).

The data ships inside scikit-learn, so nothing is downloaded. A fixed 20 % of the images (chosen with seed 0, the
same on every peer) is held out for evaluation; each peer trains on a `shard_fraction` of the rest, chosen from
its peer id. One process trained on everything reaches about 97.5 % test accuracy.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from swarmgrad.core.errors import ConfigError
from swarmgrad.core.machine import PeerId
from training.tasks.base import Batch, Evaluation, OptimizerSettings, Shard, Task, seeded_init, shard_indices

TEST_FRACTION = 0.2
SPLIT_SEED = 0
INIT_SEED = 1


def digits_file() -> Path | None:
    """The data file that scikit-learn's `load_digits` reads (`sklearn/datasets/data/digits.csv.gz`: 1,797 rows of
    64 pixel intensities and the label), found without importing scikit-learn; None if this install has no such
    file."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without running its __init__
    locations = [] if spec is None or spec.submodule_search_locations is None else spec.submodule_search_locations
    for location in locations:
        path = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits images (float, 1797 x 64) and labels (int). Importing scikit-learn costs about 1.2 s of CPU (it
    imports scipy.stats), a quarter of a peer's start-up, so its bundled file is read directly; an install that
    lays its data out otherwise goes through `load_digits`."""
    path = digits_file()
    if path is None:
        from sklearn.datasets import load_digits

        return load_digits(return_X_y=True)
    with gzip.open(path, "rt", encoding="utf-8") as text:
        table = np.loadtxt(text, delimiter=",")
    return table[:, :-1], table[:, -1].astype(np.int64)


class DigitsTask(Task):
    """MLP 64 -> `hidden` -> 10 with ReLU, cross-entropy loss, accuracy on the held-out fifth."""

    name = "digits"

    def __init__(self, *, hidden: int = 128, shard_fraction: float = 0.5, optimizer: OptimizerSettings) -> None:
        if hidden < 1:
            raise ConfigError("digits.hidden", hidden, "an integer >= 1")
        self.hidden = hidden
        self.shard_fraction = shard_fraction
        self.optimizer = optimizer
        images, labels = load_digits_arrays()
        features = torch.as_tensor(images, dtype=torch.float32) / 16.0  # pixel intensities are 0..16
        targets = torch.as_tensor(labels, dtype=torch.int64)
        order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(SPLIT_SEED))
        num_test = int(TEST_FRACTION * len(targets))
        test, train = order[:num_test], order[num_test:]
        self.train_x, self.train_y = features[train], targets[train]
        self.test_x, self.test_y = features[test], targets[test]

    def build_model(self) -> nn.Module:
        return seeded_init(
            INIT_SEED, lambda: nn.Sequential(nn.Linear(64, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 10))
        )

    def shard(self, peer_id: PeerId) -> Shard:
        indices = shard_indices(peer_id, len(self.train_y), self.shard_fraction)
        return Shard(peer_id, indices, self.optimizer.batch_size, self._sample)

    def _sample(self, indices: torch.Tensor) -> Batch:
        return self.train_x[indices], self.train_y[indices]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        inputs, targets = batch
        return F.cross_entropy(model(inputs), targets)

    def evaluate(self, model: nn.Module) -> Evaluation:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            logits = model(self.test_x)
            loss = F.cross_entropy(logits, self.test_y).item()
            accuracy = (logits.argmax(dim=1) == self.test_y).float().mean().item()
        model.train(was_training)
        return Evaluation(loss=loss, metric="accuracy", value=accuracy, higher_is_better=True)


def make_task() -> DigitsTask:
    """The factory behind the name `digits`."""
    return DigitsTask(optimizer=OptimizerSettings(kind="sgd", lr=0.1, momentum=0.9, batch_size=32))
