"""Schemas of ``launch/convert.py``, ``launch/verify.py`` and ``launch/quickstart.py``.

YAML under ``conf/`` only sets values. :func:`register` stores the schemas in Hydra's ConfigStore
(Hydra is imported lazily, so library code and tests use these dataclasses without it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sfmed.core.dtypes import FLOAT_DTYPES
from sfmed.core.errors import Problems
from sfmed.core.units import parse_size
from sfmed.models.arch import VOCAB_PAD_TP

DIRECTIONS = ("mcore", "hf")
DTYPES = ("auto", *FLOAT_DTYPES)
VERIFY_IMPLS = ("local", "transformer_engine")
VERIFY_ATTENTION = ("sdpa", "flash", "unfused")
DEVICES = ("auto", "cuda", "cpu")


@dataclass
class ConvertParallelConfig:
    """How the Megatron side is split (conversion writes this layout; any layout loads it)."""

    tp: int = 1
    """Tensor-parallel size: must divide attention heads, key/value heads and the FFN size."""

    pp: int = 1
    """Pipeline-parallel size: must divide the layers (or give layers_per_stage)."""

    layers_per_stage: list[int] | None = None
    """Uneven pipeline layout, e.g. [13, 15] for 28 layers at pp=2 (middle stages equal)."""

    def __post_init__(self):
        p = Problems()
        for k in ("tp", "pp"):
            if getattr(self, k) < 1:
                p.add(f"parallel.{k}={getattr(self, k)} must be >= 1")
        if self.layers_per_stage is not None and self.pp >= 1:
            p.check(
                len(self.layers_per_stage) == self.pp,
                f"parallel.layers_per_stage={list(self.layers_per_stage)} needs parallel.pp="
                f"{self.pp} entries",
            )
        p.raise_if_any()


@dataclass
class ConvertConfig:
    """HF model folder <-> Megatron checkpoint folder (torch_dist)."""

    to: str | None = None
    """``mcore`` (HF folder -> Megatron checkpoint) or ``hf`` (Megatron checkpoint -> HF)."""

    src: str | None = None
    """to=mcore: the HF model folder; to=hf: a checkpoint root (with
    latest_checkpointed_iteration.txt) or one of its iter_*/release folders."""

    dst: str | None = None
    """Output folder; must not exist or be empty unless overwrite=true."""

    overwrite: bool = False
    """Replace a non-empty dst (only once the new output is complete)."""

    parallel: ConvertParallelConfig = field(default_factory=ConvertParallelConfig)
    """to=mcore: the TP/PP layout of the written checkpoint."""

    dtype: str = "auto"
    """auto keeps the source dtype (exact); bfloat16 | float16 | float32 casts."""

    make_vocab_size_divisible_by: int = 128
    """to=mcore: Megatron's vocabulary padding multiple (per TP rank)."""

    vocab_pad_tp: int = VOCAB_PAD_TP
    """to=mcore: pad the vocabulary as Megatron would at TP=lcm(tp, this), so the checkpoint
    loads at every TP up to it; 1 = Megatron-LM's rule for exactly parallel.tp."""

    max_shard_size: str = "5GB"
    """to=hf: largest safetensors shard (transformers' spelling: 5GB, 500MB)."""

    hf_config: str | None = None
    """to=hf: HF folder with config.json/tokenizer, for checkpoints that carry none (e.g.
    written by Megatron-LM)."""

    progress: bool = True
    """Show a progress bar (on a terminal)."""

    def __post_init__(self):
        p = Problems()
        if self.to not in DIRECTIONS:
            p.add(f"to={self.to!r}: give to=mcore (HF -> Megatron) or to=hf (Megatron -> HF)")
        for k in ("src", "dst"):
            if not getattr(self, k):
                p.add(
                    f"{k} is required: python launch/convert.py to={self.to} "
                    "src=<folder> dst=<folder>"
                )
        p.choice("dtype", self.dtype, DTYPES)
        if self.make_vocab_size_divisible_by < 1 or self.vocab_pad_tp < 1:
            p.add(
                f"make_vocab_size_divisible_by={self.make_vocab_size_divisible_by} and "
                f"vocab_pad_tp={self.vocab_pad_tp} must be >= 1"
            )
        with p.collect():
            parse_size(self.max_shard_size)
        p.raise_if_any()


@dataclass
class VerifyConfig:
    """Compare transformers (HF folder) and megatron-core (checkpoint) logits on random tokens."""

    hf: str | None = None
    """The HF model folder (the reference)."""

    mcore: str | None = None
    """The Megatron checkpoint (root or iter_*/release folder)."""

    parallel: ConvertParallelConfig = field(default_factory=ConvertParallelConfig)
    """TP/PP the checkpoint is loaded at (tp*pp torchrun processes)."""

    device: str = "auto"
    """auto | cuda | cpu (megatron-core under the CPU emulation, gloo)."""

    dtype: str = "auto"
    """Compute dtype of both models: auto = float32 on CPU, bfloat16 on GPU."""

    batch: int = 2
    seq_length: int = 32
    seed: int = 0

    max_abs_diff: float | None = None
    """Largest allowed |logit difference| (default 1e-4 in float32, 1.0 in bfloat16)."""

    max_kl: float | None = None
    """Largest allowed mean KL(p_hf || p_megatron) (default 1e-6 float32, 5e-3 bfloat16)."""

    min_top1: float | None = None
    """Smallest allowed argmax agreement (default 1.0 float32, 0.9 bfloat16)."""

    transformer_impl: str = "local"
    """Layer spec megatron-core builds, as in training: ``local`` or ``transformer_engine``."""

    attention_backend: str = "sdpa"
    """Core attention of the local spec, as in training: ``sdpa``, ``flash`` or ``unfused``."""

    def __post_init__(self):
        p = Problems()
        for k in ("hf", "mcore"):
            if not getattr(self, k):
                p.add(f"{k} is required: python launch/verify.py hf=<HF folder> mcore=<checkpoint>")
        p.choice("device", self.device, DEVICES)
        p.choice("dtype", self.dtype, DTYPES)
        p.choice("transformer_impl", self.transformer_impl, VERIFY_IMPLS)
        p.choice("attention_backend", self.attention_backend, VERIFY_ATTENTION)
        if self.batch < 1 or self.seq_length < 1:
            p.add(f"batch={self.batch} and seq_length={self.seq_length} must be >= 1")
        p.raise_if_any()

    def tolerances(self) -> dict:
        """The tolerances given explicitly (the rest come from the dtype's defaults)."""
        return {
            k: getattr(self, k)
            for k in ("max_abs_diff", "max_kl", "min_top1")
            if getattr(self, k) is not None
        }


@dataclass
class QuickstartConfig:
    """Tiny random model -> Megatron TP x PP -> megatron-core logits check -> back to HF."""

    workdir: str = "outputs/quickstart"
    """Where the tiny model, the checkpoint and the exported copy go (rebuilt on every run)."""

    tp: int = 2
    pp: int = 2
    device: str = "auto"
    """auto | cuda | cpu (auto: the GPUs when tp*pp of them are visible, else the CPU)."""

    seed: int = 0

    def __post_init__(self):
        p = Problems()
        if self.tp < 1 or self.pp < 1:
            p.add(f"tp={self.tp} and pp={self.pp} must be >= 1")
        p.choice("device", self.device, DEVICES)
        p.raise_if_any()


def register() -> None:
    """Register ``convert_schema``, ``verify_schema`` and ``quickstart_schema`` with Hydra."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="convert_schema", node=ConvertConfig)
    cs.store(name="verify_schema", node=VerifyConfig)
    cs.store(name="quickstart_schema", node=QuickstartConfig)
