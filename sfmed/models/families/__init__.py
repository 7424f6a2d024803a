"""One module per model family; each registers itself with :mod:`sfmed.models.family`.

Adding a family: write ``sfmed/models/families/<model_type>.py`` (a :class:`ModelFamily`
subclass and ``register_family(...)``), list it here, add its tests and YAML presets.
"""

FAMILY_MODULES = (
    "sfmed.models.families.qwen2",
    "sfmed.models.families.llama",
    "sfmed.models.families.qwen3",
    "sfmed.models.families.baichuan",
)
