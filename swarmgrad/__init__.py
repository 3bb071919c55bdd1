"""swarmgrad: peer-to-peer training of PyTorch models with no coordinator."""

__version__ = "0.1.0"
