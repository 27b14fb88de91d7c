from setuptools import find_packages, setup

setup(
    name="mme5-jax",
    version="0.1.0",
    description="JAX/TPU reimplementation of mmE5, a multimodal multilingual embedding model on Llama-3.2-Vision",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mme5_jax", "mme5_jax.*", "data_synth", "data_synth.*"]),
    package_data={"": ["*.yaml", "*.json"]},
    include_package_data=True,
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
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-timeout",
            "torch==2.13.0",
            "peft",
            "llama-models",
            "tiktoken",
            "scikit-image",
            "scikit-learn",
            "openai",
            "tensorflow-datasets",
        ],
        "synth": ["openai", "httpx2"],
        "tfds": ["tensorflow-datasets"],
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],
    },
    entry_points={
        "console_scripts": [
            "mme5=mme5_jax.cli:main",
            "mme5-synth=data_synth.cli:main",
        ]
    },
)
