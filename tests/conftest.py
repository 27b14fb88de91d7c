"""Shared test setup: 8 host CPU devices, set before JAX is first imported.

LLVM optimisation is turned off for tests: it cuts XLA CPU compile time about 5x on tiny models, which dominates
the suite, and does not change floating-point semantics.
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# With libtpu installed (the plan tests compile for TPU on this host), parallel processes may each load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
