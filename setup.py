"""sfmed: Megatron-style training stack for Chinese medical LLMs (Qwen2 class)."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent

setup(
    name="sfmed",
    version="0.1.0",
    description=(
        "Qwen2 <-> Megatron conversion, data preprocessing, continued pretraining / SFT / DPO on "
        "megatron-core, and evaluation of Chinese medical LLMs"
    ),
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["sfmed", "sfmed.*"]),
    include_package_data=True,
    install_requires=[
        # torch first: install the build that matches your machine (CPU or CUDA) before sfmed.
        "torch>=2.4",
        # Exactly the releases CI tests (docs/compatibility.md): 0.16.1 (newest for Python 3.11)
        # and 0.19.x (Python 3.12). 0.17/0.18 are untested, so they are excluded.
        "megatron-core>=0.16.1,!=0.17.*,!=0.18.*,<0.20",
        "transformers>=4.56",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "sentencepiece>=0.2",
        "gigatoken>=0.10",
        "hydra-core>=1.3.2,<1.4",
        "omegaconf>=2.3,<2.4",
        "numpy>=1.24",
        "pyarrow>=14",
        "zstandard>=0.22",
        "datasketch>=1.6",
        "orjson>=3.8",
        "jieba>=0.42",
        # evaluation metrics (sfmed/eval/metrics.py): ROUGE, fast LCS for ROUGE-L, BLEU
        "rouge-score>=0.1.2",
        "rapidfuzz>=3.0",
        "sacrebleu>=2.4",
        "openai>=1.40",
        "matplotlib>=3.7",
        "wandb>=0.17",
        "rich>=13",
        "tqdm>=4.66",
        "psutil>=5.9",
        "pyyaml>=6",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "ruff==0.17.5",  # pinned: lint/format output must not drift under CI
            # a second ROUGE implementation the metric tests cross-check against
            "rouge-chinese>=1.0.3",
            # the lm_eval prompt preset is checked against lm-evaluation-harness itself
            "lm-eval>=0.4.13,<0.5",
            # the DPO losses are checked against TRL's own DPOTrainer loss code
            "trl>=1.16,<2",
            # the HF SFT engine's tests (the [hf] extra)
            "peft>=0.17",
            "accelerate>=1.10",
            "datasets>=3.0",
        ],
        # The HF SFT engine (launch/sft.py engine=hf): TRL's SFTTrainer (its padding-free collator
        # and fused loss as of 1.16), PEFT LoRA, accelerate for several GPUs.
        "hf": ["trl>=1.16,<2", "peft>=0.17", "accelerate>=1.10", "datasets>=3.0"],
        # Optional accelerators: detected at run time, never required. Transformer Engine in the
        # range megatron-core 0.16 declares (older TE fails FP8 recipes at the first forward).
        "gpu": ["transformer-engine[pytorch]>=2.9,<2.12", "flash-attn>=2.6"],
        # The backend (sfmed/eval/backends/vllm_backend.py) uses the V1 engine's API: token-id
        # prompts, prompt_logprobs with enable_prefix_caching=False for scoring, and
        # llm_engine.engine_core.shutdown() between models; older releases differ.
        "vllm": ["vllm>=0.10.2"],
    },
    entry_points={"console_scripts": []},
)
