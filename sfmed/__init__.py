"""sfmed: Megatron-style training stack for Chinese medical LLMs."""

from sfmed.core import deferred_imports as _deferred_imports

__version__ = "0.1.0"

# Before any sfmed module imports megatron-core (see sfmed/core/deferred_imports.py).
_deferred_imports.install()
