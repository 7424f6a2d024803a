"""What the entry points run: config dataclass in, result out (no Hydra here)."""

from __future__ import annotations

from sfmed.config.convert import ConvertConfig, VerifyConfig
from sfmed.convert.hf_to_mcore import convert_hf_to_mcore
from sfmed.convert.mcore_to_hf import convert_mcore_to_hf
from sfmed.convert.report import ConversionSummary
from sfmed.convert.verify import VerifyResult, verify_conversion
from sfmed.core.dtypes import torch_dtype


def run_convert(cfg: ConvertConfig) -> ConversionSummary:
    """Run the conversion ``cfg`` describes."""
    dtype = None if cfg.dtype == "auto" else torch_dtype(cfg.dtype)
    if cfg.to == "mcore":
        return convert_hf_to_mcore(
            cfg.src,
            cfg.dst,
            tp=cfg.parallel.tp,
            pp=cfg.parallel.pp,
            layers_per_stage=cfg.parallel.layers_per_stage,
            overwrite=cfg.overwrite,
            dtype=dtype,
            make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by,
            vocab_pad_tp=cfg.vocab_pad_tp,
            progress=cfg.progress,
        )
    return convert_mcore_to_hf(
        cfg.src,
        cfg.dst,
        overwrite=cfg.overwrite,
        dtype=dtype,
        max_shard_size=cfg.max_shard_size,
        hf_config=cfg.hf_config,
        progress=cfg.progress,
    )


def run_verify(cfg: VerifyConfig) -> VerifyResult:
    """Compare the logits of ``cfg.hf`` and ``cfg.mcore``."""
    return verify_conversion(
        cfg.hf,
        cfg.mcore,
        tp=cfg.parallel.tp,
        pp=cfg.parallel.pp,
        device=cfg.device,
        dtype=cfg.dtype,
        batch=cfg.batch,
        seq_length=cfg.seq_length,
        seed=cfg.seed,
        tolerances=cfg.tolerances(),
        impl=cfg.transformer_impl,
        attention=cfg.attention_backend,
    )
