"""The HF engine of SFT: TRL ``SFTTrainer`` (+ PEFT LoRA) on a Hugging Face folder.

``launch/sft.py engine=hf`` calls :func:`sfmed.hf_engine.sft.run`. It trains on the same encoded
chat datasets as the sharded engine (``launch/preprocess.py format=sft``), with the same loss
(per-token mean over the supervised tokens of the global batch), optimizer settings, LR schedule
and run-folder conventions, so the two engines give the same per-step losses (the parity gate).
"""
