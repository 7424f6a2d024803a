"""The real megatron-core training stack runs on CPU under sfmed's CUDA emulation."""

from pathlib import Path

import pytest
import torch

from conftest import parse_result
from sfmed.core import cpu_emulation

HERE = Path(__file__).parent


@pytest.mark.mcore_compat
def test_redirects_cuda_requests_and_restores():
    with cpu_emulation.cpu_emulation(force=True):
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"
        t = torch.ones(2).cuda()
        assert t.device.type == "cpu" and t.to("cuda:0").device.type == "cpu"
        assert t.pin_memory() is t
        assert t.type() == "torch.cuda.FloatTensor"
        assert t.to(torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        assert t.type(torch.float64).dtype == torch.float64
        torch.cuda.synchronize()
        torch.cuda.manual_seed(7)
        a = torch.cuda.get_rng_state()
        x = torch.rand(3)
        torch.cuda.set_rng_state(a)
        assert torch.equal(x, torch.rand(3))
    assert not cpu_emulation.is_enabled()
    assert torch.ones(1).type() == "torch.FloatTensor"


def test_grad_probes_of_activations_are_silent_and_unchanged():
    """megatron probes ``.grad`` of activations; under the emulation that must neither warn
    (torch's non-leaf warning would point at the emulation) nor change what autograd does."""
    import warnings

    leaf = torch.randn(3, requires_grad=True)
    with cpu_emulation.cpu_emulation(force=True), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        act, kept = leaf * 2, leaf * 3
        kept.retain_grad()
        (act * kept).sum().backward()
        assert hasattr(act, "grad") and act.grad is None
        assert torch.equal(kept.grad, 2 * leaf.detach())
        assert torch.equal(leaf.grad, 12 * leaf.detach())
    assert [str(w.message)[:40] for w in caught if "not a leaf" in str(w.message)] == []


@pytest.mark.dist
@pytest.mark.mcore_compat
@pytest.mark.parametrize("tp,pp", [(2, 2)])
def test_gptmodel_trains_and_checkpoints_tp_pp(torchrun, tmp_path, tp, pp):
    """GPTModel + DDP + distributed optimizer at TP=2×PP=2 (gloo): loss falls, dist ckpt reloads."""
    proc = torchrun(HERE / "worker_train_smoke.py", tp, pp, 12, tmp_path / "ckpt", nproc=tp * pp)
    res = parse_result(proc.stdout)
    losses = res["losses"]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    assert res["reload_equal"]
