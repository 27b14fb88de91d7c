"""The Flax NNX port of Mllama (Llama-3.2-Vision): vision tower, projector and text decoder."""
