"""A compact reference forward of Baichuan / Baichuan2, written from the published architecture
(the releases' modeling_baichuan.py, which is hub remote code): W_pack = [q; k; v], RMSNorm,
SwiGLU, RoPE (7B) or ALiBi (13B, BLOOM-style interleaved slopes, bias slope_h * key position
plus the causal mask), NormHead (Baichuan2: lm_head rows L2-normalised). fp32, plain torch;
independent of sfmed's mapping and megatron-core."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file


def _rms(x, w, eps):
    var = x.pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(var + eps))


def _slopes(n: int) -> list[float]:
    # modeling_baichuan.py (13B): _get_interleave
    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return pow2(n)
    closest = 2 ** math.floor(math.log2(n))
    return pow2(closest) + _slopes(2 * closest)[0::2][: n - closest]


def _rope(x, theta):
    # x [b, h, s, d]; LLaMA's rotate_half convention
    s, d = x.shape[2], x.shape[3]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(torch.arange(s).float(), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def baichuan_logits(hf_dir, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, vocab] of the Baichuan checkpoint in ``hf_dir`` for ``tokens`` [b, s]."""
    hf_dir = Path(hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    w = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        w.update({k: v.float() for k, v in load_file(str(f)).items()})
    h, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["rms_norm_eps"]
    d = h // heads
    alibi = cfg.get("position_embedding_type", "rope" if h == 4096 else "alibi") == "alibi"
    norm_head = cfg.get("norm_head", cfg["vocab_size"] == 125696)
    b, s = tokens.shape
    x = w["model.embed_tokens.weight"][tokens]
    causal = torch.full((s, s), float("-inf")).triu(1)
    if alibi:
        bias = torch.tensor(_slopes(heads))[:, None, None] * torch.arange(s).float()[None, None]
        mask = bias + causal  # [heads, s, s]
    else:
        mask = causal
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        y = _rms(x, w[p + "input_layernorm.weight"], eps)
        qkv = y @ w[p + "self_attn.W_pack.weight"].T
        q, k, v = (t.view(b, s, heads, d).transpose(1, 2) for t in qkv.split(h, dim=-1))
        if not alibi:
            q, k = (
                _rope(q, cfg.get("rope_theta", 10000.0)),
                _rope(k, cfg.get("rope_theta", 10000.0)),
            )
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + mask, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, s, h)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        y = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = torch.nn.functional.silu(y @ w[p + "mlp.gate_proj.weight"].T)
        x = x + (gate * (y @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    x = _rms(x, w["model.norm.weight"], eps)
    head = w["lm_head.weight"]
    if norm_head:
        head = torch.nn.functional.normalize(head)
    return x @ head.T
