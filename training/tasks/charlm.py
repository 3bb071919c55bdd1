"""The built-in `charlm` task: a small character-level transformer on text that ships with every CPython.

The text is the stdlib's `pydoc_data/topics.py` (the `help()` topics, ~465k characters of English), joined in
sorted topic order. The vocabulary is fixed, not read from the text (newline, printable ASCII, and one slot for
everything else), so every peer builds the same model whatever its Python version. The last 10 % of the text is
held out; the headline metric is bits per character on fixed windows of it. Examples are the text's
`block_size`-character windows; each peer trains on a `shard_fraction` of them, chosen from its peer id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pydoc_data import topics

import torch
from torch import nn
from torch.nn import functional as F

from swarmgrad.core.errors import ConfigError
from swarmgrad.core.machine import PeerId
from training.tasks.base import Batch, Evaluation, OptimizerSettings, Shard, Task, seeded_init, shard_indices

VOCAB = "\n" + "".join(chr(code) for code in range(32, 127))
UNKNOWN = len(VOCAB)
VOCAB_SIZE = len(VOCAB) + 1
TEST_FRACTION = 0.1
INIT_SEED = 2


@dataclass(frozen=True)
class CharLMConfig:
    """Shape of the transformer and of its evaluation."""

    block_size: int = 64
    n_embd: int = 64
    n_head: int = 4
    n_layer: int = 2
    eval_windows: int = 64

    def __post_init__(self) -> None:
        for field in ("block_size", "n_embd", "n_head", "n_layer", "eval_windows"):
            if getattr(self, field) < 1:
                raise ConfigError(f"charlm.{field}", getattr(self, field), "an integer >= 1")
        if self.n_embd % self.n_head:
            raise ConfigError("charlm.n_head", self.n_head, f"a divisor of n_embd={self.n_embd}")


def encode(text: str) -> torch.Tensor:
    """Characters to token ids (int64); characters outside the vocabulary map to `UNKNOWN`."""
    lookup = {char: index for index, char in enumerate(VOCAB)}
    return torch.tensor([lookup.get(char, UNKNOWN) for char in text], dtype=torch.int64)


def corpus() -> str:
    """The training text: every pydoc topic, in sorted topic order."""
    return "\n".join(topics.topics[key] for key in sorted(topics.topics))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: CharLMConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, channels = x.shape
        # one matmul for queries, keys and values; then split heads: (batch, head, time, head_dim)
        q, k, v = self.qkv(x).split(channels, dim=2)
        q, k, v = (t.view(batch, time, self.n_head, channels // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, time, channels))


class Block(nn.Module):
    """Pre-norm transformer block: attention then a 4x MLP, each added to the residual stream."""

    def __init__(self, config: CharLMConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_mlp = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd), nn.GELU(), nn.Linear(4 * config.n_embd, config.n_embd)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class CharTransformer(nn.Module):
    """Token + learned position embeddings, `n_layer` blocks, a final norm and a linear head over the vocabulary."""

    def __init__(self, config: CharLMConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(VOCAB_SIZE, config.n_embd)
        self.position_embedding = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.Sequential(*(Block(config) for _ in range(config.n_layer)))
        self.ln_final = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, VOCAB_SIZE)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        return self.head(self.ln_final(self.blocks(x)))  # logits: (batch, time, vocab)


class CharLMTask(Task):
    """Next-character prediction; cross-entropy loss; bits per character on the held-out tail of the text."""

    name = "charlm"

    def __init__(self, *, config: CharLMConfig, shard_fraction: float = 0.5, optimizer: OptimizerSettings) -> None:
        self.config = config
        self.shard_fraction = shard_fraction
        self.optimizer = optimizer
        tokens = encode(corpus())
        split = int(len(tokens) * (1 - TEST_FRACTION))
        self.train_tokens, self.test_tokens = tokens[:split], tokens[split:]
        span = config.block_size + 1  # inputs and the targets shifted by one
        self.num_windows = (len(self.train_tokens) - span) // config.block_size + 1
        num_eval = min(config.eval_windows, len(self.test_tokens) // span)
        if num_eval < 1:
            raise ConfigError("charlm.block_size", config.block_size, "shorter than the held-out text")
        starts = torch.arange(num_eval) * ((len(self.test_tokens) - span) // num_eval)
        self.eval_batch = self._windows(self.test_tokens, starts)

    def _windows(self, tokens: torch.Tensor, starts: torch.Tensor) -> Batch:
        offsets = torch.arange(self.config.block_size + 1)
        rows = tokens[starts[:, None] + offsets[None, :]]
        return rows[:, :-1], rows[:, 1:]

    def build_model(self) -> nn.Module:
        return seeded_init(INIT_SEED, lambda: CharTransformer(self.config))

    def shard(self, peer_id: PeerId) -> Shard:
        indices = shard_indices(peer_id, self.num_windows, self.shard_fraction)
        return Shard(peer_id, indices, self.optimizer.batch_size, self._sample)

    def _sample(self, indices: torch.Tensor) -> Batch:
        return self._windows(self.train_tokens, indices * self.config.block_size)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        inputs, targets = batch
        logits = model(inputs)
        return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1))

    def evaluate(self, model: nn.Module) -> Evaluation:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            loss = self.loss(model, self.eval_batch).item()
        model.train(was_training)
        return Evaluation(loss=loss, metric="bits_per_char", value=loss / math.log(2), higher_is_better=False)


def make_task() -> CharLMTask:
    """The factory behind the name `charlm`."""
    return CharLMTask(
        config=CharLMConfig(), optimizer=OptimizerSettings(kind="adamw", lr=3e-3, batch_size=32, weight_decay=0.01)
    )
