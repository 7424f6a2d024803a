"""TP larger than the number of KV heads (megatron-core: TP a multiple of the query groups; each
rank all-gathers its group's QKV and keeps its own query heads). Conversion both ways is exact,
the stored blocks are megatron-core's even row split of the per-group interleaved QKV, and the
refusal of an impossible TP lists the valid choices."""

from __future__ import annotations

import pytest
import torch

from sfmed.convert import convert_hf_to_mcore, convert_mcore_to_hf
from sfmed.convert.quickstart import compare_hf_folders
from sfmed.core.errors import ConfigError
from sfmed.core.parallel import valid_tp, validate_parallel
from sfmed.models import arch_from_hf_config
from sfmed.models import mapping as T


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_at_tp_above_kv_heads(tiny_qwen2_factory, tmp_path, tied):
    hf = tiny_qwen2_factory(num_kv_heads=2, tie_word_embeddings=tied)  # 8 heads, 2 KV heads
    for tp, pp in ((4, 1), (4, 2), (8, 1)):
        ck, back = tmp_path / f"mc{tp}{pp}", tmp_path / f"hf{tp}{pp}"
        convert_hf_to_mcore(hf, ck, tp=tp, pp=pp, progress=False)
        convert_mcore_to_hf(ck, back, progress=False)
        assert compare_hf_folders(hf, back) == [], (tp, pp)
        assert len(list((ck / "release").glob("*.distcp"))) == tp * pp


def test_qkv_blocks_are_megatrons_row_split_when_tp_exceeds_groups(tiny_qwen2_factory):
    arch = arch_from_hf_config(tiny_qwen2_factory(num_kv_heads=2))
    d, heads, groups = arch.kv_channels, arch.num_attention_heads, arch.num_query_groups
    g = torch.Generator().manual_seed(0)
    for m in (T.QKV(T.QKV_W, ("q", "k", "v")), T.QKV(T.QKV_B, ("q", "k", "v"), bias=True)):
        hf = [torch.randn(s, generator=g) for s in m.hf_shapes(arch)]
        q, k, v = hf
        # Independent layout: group j = [q heads of j; k_j; v_j], groups stacked.
        per = heads // groups
        fused = torch.cat(
            [
                torch.cat([q[j * per * d : (j + 1) * per * d], k[j * d : (j + 1) * d],
                           v[j * d : (j + 1) * d]])
                for j in range(groups)
            ]
        )  # fmt: skip
        for tp in (4, 8):
            rows = fused.shape[0] // tp
            for rank in range(tp):
                ((off, data),) = m.tp_blocks(hf, arch, tp, rank)
                assert off[0] == rank * rows
                assert torch.equal(data, fused[rank * rows : (rank + 1) * rows]), (tp, rank)


def test_tp_choices_follow_megatron_core():
    from types import SimpleNamespace

    gqa2 = SimpleNamespace(
        num_layers=4, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=128, kv_channels=8
    )
    assert valid_tp(gqa2) == [1, 2, 4, 8]
    validate_parallel(gqa2, 4, 1)
    validate_parallel(gqa2, 8, 2)
    with pytest.raises(ConfigError, match=r"parallel.tp=3 does not divide.*\[1, 2, 4, 8\]"):
        validate_parallel(gqa2, 3, 1)
    # 12 heads, 8 groups: 4 divides both, 6 divides the heads but is neither a divisor nor a
    # multiple of 8 (megatron-core's TransformerConfig raises for it).
    odd = SimpleNamespace(
        num_layers=2, num_attention_heads=16, num_query_groups=8, ffn_hidden_size=96, kv_channels=4
    )
    assert valid_tp(odd) == [1, 2, 4, 8, 16]
    gqa3 = SimpleNamespace(
        num_layers=2, num_attention_heads=12, num_query_groups=4, ffn_hidden_size=96, kv_channels=8
    )
    with pytest.raises(ConfigError, match=r"tp=6 does not divide num_key_value_heads.*multiple"):
        validate_parallel(gqa3, 6, 1)
    # megatron-core's own check agrees with every choice offered
    from megatron.core.transformer import TransformerConfig

    for arch in (gqa2, odd, gqa3):
        for tp in range(1, arch.num_attention_heads + 1):
            ok = True
            try:
                TransformerConfig(
                    num_layers=2, hidden_size=arch.num_attention_heads * arch.kv_channels,
                    num_attention_heads=arch.num_attention_heads,
                    num_query_groups=arch.num_query_groups, tensor_model_parallel_size=tp,
                )  # fmt: skip
            except ValueError:
                ok = False
            if tp in valid_tp(arch):
                assert ok, (arch, tp)
            elif (
                arch.num_attention_heads % tp == 0
                and ((arch.num_attention_heads + 2 * arch.num_query_groups) * arch.kv_channels) % tp
                == 0
            ):
                assert not ok, (arch, tp)
