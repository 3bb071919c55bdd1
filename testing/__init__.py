"""Test and benchmark harnesses: process runners, network-namespace topologies, in-process fakes. Nothing in the
product (swarmgrad, p2p, gossip, training, consensus, sim) imports this package, and it is not installed."""
