"""sfmed's core attention (PyTorch SDPA) equals megatron's DotProductAttention on CPU, at TP=2."""

from pathlib import Path

import pytest

from conftest import parse_result

HERE = Path(__file__).parent


@pytest.mark.dist
@pytest.mark.mcore_compat
def test_sdpa_attention_matches_megatron_unfused_attention(torchrun):
    res = parse_result(torchrun(HERE / "worker_attention.py", nproc=2, timeout=600).stdout)
    core = res["core"]
    # [s, b, heads_per_rank * head_dim]: 4 of 8 heads per TP rank, GQA 1 of 2 groups per rank
    assert core["shape"] == [24, 3, 32]
    assert core["max_diff"] < 1e-5 and core["max_grad_diff"] < 1e-4, core
    assert core["causal"]
    # Whole GPTModel (TP=2) with the SDPA spec vs the unfused spec: logits and every gradient.
    for case in ("sdpa", "sdpa_sp"):
        assert res[case]["max_diff"] < 1e-5, res
        assert res[case]["max_grad_diff"] < 1e-5, res
    # Sequence parallelism: norm weights are marked so megatron all-reduces their grads over TP.
    assert res["sdpa_sp"]["norms_marked"] and res["sdpa"]["norms_marked"]
