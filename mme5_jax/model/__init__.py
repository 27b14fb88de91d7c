"""The Flax NNX port of Mllama (Llama-3.2-Vision): vision tower, projector and text decoder.

The names a config may give for the model's settings live here, without JAX, so configs validate before JAX starts.
"""

# Compute / weight dtypes by name (each is also the jax.numpy and ml_dtypes attribute of that name).
DTYPES = ("float32", "bfloat16")

# How `mme5_jax.model.init.random_model` draws a random model's kernels.
INITS = ("hf", "lecun")

# `remat` policies of the scanned layer stacks: name -> the jax.checkpoint_policies member that says what the
# backward pass may keep (None: no rematerialisation; "full" recomputes every matmul, "dots" keeps them all,
# "dots_no_batch" keeps those without batch dimensions, i.e. recomputes attention).
REMAT_POLICIES = {
    "none": None,
    "full": "nothing_saveable",
    "dots": "dots_saveable",
    "dots_no_batch": "dots_with_no_batch_dims_saveable",
}
