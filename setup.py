"""Packaging for megatron_mosaic: Memory Mosaics (v1, v2) on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron_mosaic",
    version="0.1.0",
    description="Distributed pretraining of Memory Mosaics (v1 and v2) on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_mosaic", "megatron_mosaic.*"]),
    install_requires=[
        # Ranges for a user's own environment (a GPU box brings its own CUDA torch). `make`
        # installs exactly requirements/lock.txt, CPU torch first: an unconstrained resolve of
        # torch on a fresh machine pulls a multi-GB CUDA build.
        "torch>=2.6",  # megatron-core 0.16's floor; FlexAttention and DCP as used here
        # The CPU patches (training/cuda_compat.py) and the optimizer-fallback fixes are written
        # against 0.16.1's call sites; 0.17 also needs Python 3.12.
        "megatron-core>=0.16.1,<0.17",
        # megatron.core.dist_checkpointing imports psutil without declaring it.
        "psutil",
        "numpy",
        "sentencepiece",
        # GPT2BPETokenizer (byte-level BPE from vocab.json + merges.txt) in tools/preprocess_data.py.
        "tokenizers",
        "nltk",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "hf": ["transformers>=5.0", "safetensors"],
        "te": ["transformer-engine[pytorch]"],
        # --wandb-project (Weights & Biases logging; offline mode needs no network).
        "wandb": ["wandb"],
        # lm-evaluation-harness over an exported model (`lm_eval --model hf`, whose module imports
        # accelerate; lm_eval[hf] would also pull peft, which only adapters need).
        "eval": ["lm_eval>=0.4.13,<0.5", "accelerate"],
        "dev": ["pytest", "transformers>=5.0", "safetensors", "tokenizers", "wandb", "lm_eval>=0.4.13,<0.5",
                "accelerate"],
    },
)
