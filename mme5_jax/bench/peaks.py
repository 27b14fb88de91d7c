"""Peak FLOP/s per chip, the MFU/HFU denominator.

Accelerators use their published dense bf16 peak. A CPU has no meaningful datasheet number for
XLA, so its "peak" is measured: the best rate of a large jitted matmul in the benchmark's dtype. Host "devices"
created with `--xla_force_host_platform_device_count` share the same cores, so each device of the benchmark's
mesh gets an equal share.
"""
import time

import jax
import jax.numpy as jnp

# (substring of jax Device.device_kind, lower-cased; name; bf16 dense TFLOP/s). First match wins: the more
# specific names come first ("tpu v5 lite" is v5e, plain "tpu v5" is v5p).
PEAK_TFLOPS = (
    ("tpu v6 lite", "TPU v6e", 918.0),
    ("tpu v6e", "TPU v6e", 918.0),
    ("tpu v5 lite", "TPU v5e", 197.0),
    ("tpu v5e", "TPU v5e", 197.0),
    ("tpu v5p", "TPU v5p", 459.0),
    ("tpu v5", "TPU v5p", 459.0),
    ("tpu v4", "TPU v4", 275.0),
    ("h200", "NVIDIA H200", 989.0),
    ("h100", "NVIDIA H100", 989.0),
)


# One TPU chip: bf16 dense FLOP/s, HBM bytes, HBM bytes/s, as Google Cloud publishes them per generation (system
# architecture pages: cloud.google.com/tpu/docs/v5e, /v5p, /v6e). Ahead-of-time plans use them (mme5_jax.plan).
TPU_CHIPS = {
    "v5e": {"name": "TPU v5e", "bf16_flops_per_s": 197e12, "hbm_bytes": 16 * 2**30, "hbm_bytes_per_s": 819e9,
            "source": "https://cloud.google.com/tpu/docs/v5e"},
    "v5p": {"name": "TPU v5p", "bf16_flops_per_s": 459e12, "hbm_bytes": 95 * 2**30, "hbm_bytes_per_s": 2765e9,
            "source": "https://cloud.google.com/tpu/docs/v5p"},
    "v6e": {"name": "TPU v6e", "bf16_flops_per_s": 918e12, "hbm_bytes": 32 * 2**30, "hbm_bytes_per_s": 1640e9,
            "source": "https://cloud.google.com/tpu/docs/v6e"},
}


def table_peak(device_kind: str):
    """(name, peak FLOP/s) for a known accelerator, else None."""
    kind = device_kind.lower()
    for key, name, tflops in PEAK_TFLOPS:
        if key in kind:
            return name, tflops * 1e12
    return None


def cpu_matmul_probe(dtype="float32", size=1024, repeats=5) -> float:
    """Best FLOP/s of a [size, size] matmul chain on the first device (all host cores take part)."""
    dtype = jnp.dtype(dtype)
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
    chain = 8

    @jax.jit
    def work(x):
        for _ in range(chain):
            x = jnp.dot(x, a, preferred_element_type=dtype) * jnp.asarray(1e-3, dtype)
        return x

    work(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return chain * 2.0 * size**3 / best


def peak_per_device(devices, dtype="float32") -> dict:
    """{"name", "flops_per_s" (per device), "source": "table" | "measured"} for the devices a benchmark runs on."""
    kind = devices[0].device_kind
    known = table_peak(kind)
    if known is not None:
        name, flops = known
        return {"name": name, "flops_per_s": flops, "source": "table", "device_kind": kind}
    if devices[0].platform != "cpu":
        raise ValueError(f"no peak FLOP/s known for device kind {kind!r}; add it to PEAK_TFLOPS in {__name__}")
    probe = cpu_matmul_probe(dtype)
    return {"name": f"CPU matmul probe ({dtype}, shared by {len(devices)} devices)",
            "flops_per_s": probe / len(devices),
            "source": "measured", "device_kind": kind}
