"""A recipe as one command: stages (one module per kind), the plan, the manifest, the runners.

``python launch/pipeline.py recipe=<name>`` composes :class:`sfmed.config.pipeline.PipelineConfig`,
:func:`sfmed.pipeline.plan.make_plan` decides what runs (and says why, before any work), and a
runner (:mod:`sfmed.pipeline.runner`) runs the stages locally or as a Slurm job chain.
"""
