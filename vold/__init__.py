"""vold: on-policy distillation from a text LLM teacher into a VLM student (GRPO + reverse KL)."""

__version__ = "0.1.0"
