"""Export writes the dtype the model came in with: a bf16 model held in fp32 (as a CPU run
trains it) exports as bf16 unless ``dtype=`` says otherwise, and the summary line names it."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from sfmed.convert import convert_hf_to_mcore
from sfmed.convert.mcore_to_hf import convert_mcore_to_hf
from sfmed.core import megatron_layout as layout
from sfmed.utils.tiny import make_tiny_qwen2


def _dtypes(hf_dir) -> set[str]:
    out = set()
    for f in hf_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            out |= {str(st.get_slice(k).get_dtype()) for k in st.keys()}  # noqa: SIM118
    return out


def test_export_defaults_to_the_source_dtype(tmp_path):
    hf = make_tiny_qwen2(tmp_path / "hf", dtype=torch.bfloat16)
    # Held in fp32, as a CPU run (precision fp32) stores the weights it trained.
    convert_hf_to_mcore(hf, tmp_path / "mcore", dtype=torch.float32, progress=False)
    meta = layout.read_meta(layout.resolve_checkpoint(tmp_path / "mcore"))
    assert (meta["dtype"], meta["source_dtype"]) == ("float32", "bfloat16")
    out = convert_mcore_to_hf(tmp_path / "mcore", tmp_path / "back", progress=False)
    assert _dtypes(tmp_path / "back") == {"BF16"}
    assert out.dtype == "bfloat16" and "(bfloat16)" in out.line()
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg.get("torch_dtype", cfg.get("dtype")) == "bfloat16"
    # An explicit dtype= still wins.
    out32 = convert_mcore_to_hf(
        tmp_path / "mcore", tmp_path / "f32", dtype=torch.float32, progress=False
    )
    assert _dtypes(tmp_path / "f32") == {"F32"} and "(float32)" in out32.line()
