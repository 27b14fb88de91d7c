"""`mme5 plan`: the train step (or the embedding forward) compiled for a TPU topology ahead of time, on any host.

Modules: `topology` (names and abstract devices), `workload` (what a config asks to compile), `aot` (abstract
state and batch, lower and compile), `hlo_text` (the compiled HLO, parsed), `hlo_cost` (loop-aware FLOPs and
bytes from it), `report` (the plan and its table), `search` (bisection over pairs or chunks), `cli`. Nothing
here imports JAX at import time, so the CLI can set its runtime first.
"""
