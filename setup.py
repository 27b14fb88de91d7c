from setuptools import find_packages, setup

setup(
    name="mme5-jax",
    version="0.1.0",
    description="JAX/TPU reimplementation of mmE5, a multimodal multilingual embedding model on Llama-3.2-Vision",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mme5_jax", "mme5_jax.*", "data_synth", "data_synth.*"]),
    # Every bundled config, subfolders included; only these (the config subfolders are data, not packages).
    package_data={"mme5_jax.configs": ["**/*.yaml"]},
    include_package_data=False,
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "grain",
        "array_record",
        "transformers>=4.46",
        "safetensors",
        "pillow",
        "numpy",
        "pyyaml",
        "tqdm",
        "pyarrow",
        "tensorboard",
        "matplotlib",
        "llama-models",  # the offline Llama-3 tokenizer of the demo's processor
        "tiktoken",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-timeout",
            "torch==2.13.0",
            "peft",
            "scikit-image",
            "scikit-learn",
            "openai",
            "tensorflow-datasets",
            "ruff",
            "jax[tpu]==0.10.2",  # libtpu for tests/test_plan.py's ahead-of-time TPU compiles (no chips needed)
        ],
        "synth": ["openai", "httpx2"],
        "tfds": ["tensorflow-datasets"],
        "tpu": ["jax[tpu]==0.10.2"],  # libtpu built for this JAX; also what `mme5 plan` compiles with
        "gpu": ["jax[cuda12]"],
    },
    entry_points={
        "console_scripts": [
            "mme5=mme5_jax.cli:main",
            "mme5-synth=data_synth.cli:main",
        ]
    },
)
