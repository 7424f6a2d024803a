"""sfmed: Megatron-style training stack for Chinese medical LLMs."""

__version__ = "0.1.0"
