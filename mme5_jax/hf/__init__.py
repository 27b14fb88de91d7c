"""Hugging Face Mllama interop: `layout` (key and config.json layouts of each transformers release), `weights`
(the HF key <-> parameter table), `reader` and `writer` (streaming safetensors I/O).

Nothing is imported here, so importing one module of the layer does not pull in the others: the base-checkpoint
format needs `weights`, and `writer` builds on that format.
"""
