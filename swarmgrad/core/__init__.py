"""The leaf core of swarmgrad: what every protocol and both drivers stand on, importing nothing of ours above it.

* `machine`: the sans-IO contract (`step(now, event) -> list[Action]`), its input events and its actions,
  effects included (`Compute` and the `Effect` base that protocols extend);
* `errors`: the one exception hierarchy;
* `transport`: the `Transport` contract both transports honour;
* `codec`: wire frames and typed messages; `typed`: the one checked conversion of untrusted plain data (msgpack
  from the network, TOML from the user) into frozen dataclasses;
* `driver`: the one trio driver that runs a machine over a transport and carries out its actions.
"""
