"""fairseq_ext: finetune Hugging Face Auto models from fairseq-train, from one CPU to many GPUs."""

from setuptools import find_packages, setup

setup(
    name="fairseq_ext",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["fairseq_ext", "fairseq_ext.*"]),
    python_requires=">=3.10",
    # Ranges here, exact pins in requirements.txt; fairseq comes from the ve-fairseq wheel (imports as fairseq).
    install_requires=[
        "torch>=2.6",
        "transformers>=5.0",
        "tokenizers",
        "peft",
        "datasets",
        "tensorboardX",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
    ],
)
