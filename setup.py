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
        # Pinned: a bare `torch` requirement can pull a multi-GB CUDA build.
        "torch==2.13.0",
        # 0.17+ needs Python 3.12; 0.16.x is the line we test against.
        "megatron-core==0.16.1",
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
        "dev": ["pytest", "transformers>=5.0", "safetensors", "tokenizers"],
    },
)
