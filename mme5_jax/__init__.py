"""mme5-jax: the JAX/TPU reimplementation of mmE5 (multimodal, multilingual embeddings on Llama-3.2-Vision)."""

__all__ = ["Embedder"]


def __getattr__(name):
    if name == "Embedder":
        from mme5_jax.embedder import Embedder

        return Embedder
    raise AttributeError(name)
