"""The Flax NNX port of Mllama (Llama-3.2-Vision): vision tower, projector and text decoder.

The names a config may give for the model's settings live here, without JAX, so configs validate before JAX starts.
"""

# Compute / weight dtypes by name (each is also the jax.numpy and ml_dtypes attribute of that name).
DTYPES = ("float32", "bfloat16")

# How `mme5_jax.model.init.random_model` draws a random model's kernels.
INITS = ("hf", "lecun")

# `remat` policies of the scanned layer stacks: name -> the jax.checkpoint_policies member that says what the
# backward pass may keep (None: no rematerialisation; "full" recomputes every matmul, "dots" keeps them all,
# "dots_no_batch" keeps those without batch dimensions, i.e. recomputes attention). "full_keep_attention"
# recomputes every matmul but keeps the splash attention kernels' outputs and log-sum-exps (`save_only_these_names`
# of `ATTENTION_RESIDUALS`): their forward is the costliest part to recompute, their outputs small beside the
# activations. It applies where splash runs (TPU); the blocked path saves nothing under it, as under "full".
REMAT_POLICIES = {
    "none": None,
    "full": "nothing_saveable",
    "full_keep_attention": "save_only_these_names",
    "dots": "dots_saveable",
    "dots_no_batch": "dots_with_no_batch_dims_saveable",
}
ATTENTION_RESIDUALS = "splash_attention_residuals"
# Per-tower combinations: name -> (vision tower policy, text decoder policy). Per example the vision tower holds
# about ten times the decoder's activations (4 tiles of 1025 patches against 256 tokens), so the decoder can keep
# every matmul output where the tower cannot.
REMAT_COMBINATIONS = {"vision_keep_attention_text_dots": ("full_keep_attention", "dots")}
REMAT_CHOICES = (*REMAT_POLICIES, *REMAT_COMBINATIONS)


def tower_remat(remat: str) -> tuple[str, str]:
    """The (vision tower, text decoder) policies of a `remat` choice."""
    return REMAT_COMBINATIONS.get(remat, (remat, remat))
