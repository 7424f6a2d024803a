"""Training recipes: what each stage adds to the shared trainer (:mod:`sfmed.train`).

:mod:`sfmed.recipes.base` defines the :class:`~sfmed.recipes.base.Recipe` protocol;
:mod:`sfmed.recipes.pretrain` is continued pretraining.
"""
