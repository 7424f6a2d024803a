"""DPO loss variants against their published formulas, written out here in plain ``math``.

Every expected loss and gradient below is computed per pair with scalar arithmetic from the
paper's formula and its derivative by hand — never with the module under test or autograd.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sfmed.core.errors import ConfigError, UserError
from sfmed.recipes.dpo_loss import DPOLossConfig, dpo_loss, metrics_from_sums

# Three pairs: an ordinary one, one the policy already prefers strongly (β h > 1, so the hinge
# is flat there), one the policy gets wrong.
C = [-10.0, -5.0, -25.5]  # policy, chosen
R = [-12.0, -30.0, -20.0]  # policy, rejected
C0 = [-11.0, -20.0, -24.0]  # reference, chosen
R0 = [-11.5, -28.0, -21.0]  # reference, rejected
NC = [5, 12, 3]  # chosen answer tokens
NR = [6, 9, 4]
BETA = 0.1


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def margin(i: int, ref: bool = True) -> float:
    """h = (c - c0) - (r - r0): DPO's implicit reward margin (eq. 7 of the DPO paper)."""
    c0, r0 = (C0[i], R0[i]) if ref else (0.0, 0.0)
    return (C[i] - c0) - (R[i] - r0)


def hand_sigmoid(eps: float, ref: bool = True):
    """cDPO: L = -(1-ε) log σ(βh) - ε log σ(-βh); dL/dh = -(1-ε) β σ(-βh) + ε β σ(βh)."""
    out = []
    for i in range(3):
        h = margin(i, ref)
        loss = -(1 - eps) * logsig(BETA * h) - eps * logsig(-BETA * h)
        dh = -(1 - eps) * BETA * sig(-BETA * h) + eps * BETA * sig(BETA * h)
        out.append((loss, dh, -dh))  # dh/dc = 1, dh/dr = -1
    return out


def hand_ipo():
    """IPO eq. 17 with TRL's per-token log-ratios: L = (h̄ - 1/(2β))²,
    h̄ = (c-c0)/n_c - (r-r0)/n_r; dL/dc = 2(h̄ - 1/(2β))/n_c, dL/dr = -2(h̄ - 1/(2β))/n_r."""
    out = []
    for i in range(3):
        hb = (C[i] - C0[i]) / NC[i] - (R[i] - R0[i]) / NR[i]
        d = hb - 1 / (2 * BETA)
        out.append((d * d, 2 * d / NC[i], -2 * d / NR[i]))
    return out


def hand_hinge():
    """L = max(0, 1 - βh); dL/dh = -β where 1 - βh > 0, else 0."""
    out = []
    for i in range(3):
        h = margin(i)
        active = 1 - BETA * h > 0
        out.append((max(0.0, 1 - BETA * h), -BETA if active else 0.0, BETA if active else 0.0))
    return out


def hand_robust(eps: float):
    """rDPO eq. 8: L = [-(1-ε) log σ(βh) + ε log σ(-βh)] / (1-2ε);
    dL/dh = [-(1-ε) β σ(-βh) - ε β σ(βh)] / (1-2ε)."""
    out = []
    for i in range(3):
        h = margin(i)
        loss = (-(1 - eps) * logsig(BETA * h) + eps * logsig(-BETA * h)) / (1 - 2 * eps)
        dh = (-(1 - eps) * BETA * sig(-BETA * h) - eps * BETA * sig(BETA * h)) / (1 - 2 * eps)
        out.append((loss, dh, -dh))
    return out


def run(cfg: DPOLossConfig, **kw):
    c = torch.tensor(C, dtype=torch.float64, requires_grad=True)
    r = torch.tensor(R, dtype=torch.float64, requires_grad=True)
    c0 = torch.tensor(C0, requires_grad=True)
    r0 = torch.tensor(R0, requires_grad=True)
    out = dpo_loss(cfg, c, r, c0, r0, torch.tensor(NC), torch.tensor(NR), **kw)
    out.losses.mean().backward()
    return out, c.grad, r.grad, (c0.grad, r0.grad)


CASES = {
    "sigmoid": (DPOLossConfig(beta=BETA), lambda: hand_sigmoid(0.0)),
    "cdpo": (DPOLossConfig(beta=BETA, label_smoothing=0.2), lambda: hand_sigmoid(0.2)),
    "ipo": (DPOLossConfig(loss_type="ipo", beta=BETA), hand_ipo),
    "hinge": (DPOLossConfig(loss_type="hinge", beta=BETA), hand_hinge),
    "robust": (DPOLossConfig(loss_type="robust", beta=BETA, label_smoothing=0.1), lambda: (
        hand_robust(0.1))),
    "reference_free": (
        DPOLossConfig(beta=BETA, reference_free=True),
        lambda: hand_sigmoid(0.0, ref=False),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_gradient_match_the_formula(name):
    cfg, hand = CASES[name]
    exp = hand()
    out, gc, gr, ref_grads = run(cfg)
    assert out.losses.shape == (3,)
    assert out.losses.tolist() == pytest.approx([e[0] for e in exp], rel=1e-6, abs=1e-9)
    # the loss is the mean over pairs, so each pair's gradient carries a 1/3
    assert gc.tolist() == pytest.approx([e[1] / 3 for e in exp], rel=1e-6, abs=1e-12)
    assert gr.tolist() == pytest.approx([e[2] / 3 for e in exp], rel=1e-6, abs=1e-12)
    assert ref_grads == (None, None), "the reference is frozen: no gradient may reach it"


def test_hinge_is_flat_where_the_margin_is_met():
    _, gc, gr, _ = run(DPOLossConfig(loss_type="hinge", beta=BETA))
    assert BETA * margin(1) > 1 and gc[1] == 0 and gr[1] == 0
    assert gc[0] != 0 and gc[2] != 0


def test_rpo_adds_alpha_times_the_per_token_nll_of_the_chosen_answers():
    alpha = 0.7
    out, gc, gr, _ = run(DPOLossConfig(beta=BETA, rpo_alpha=alpha))
    base = hand_sigmoid(0.0)
    nll = -sum(C) / sum(NC)  # mean NLL over every chosen token of the batch (TRL)
    total = sum(e[0] for e in base) / 3 + alpha * nll
    assert out.losses.mean().item() == pytest.approx(total, rel=1e-9)
    # d/dc_i of alpha * (-Σc)/Σn is -alpha/Σn; rejected answers get no NLL gradient
    assert gc.tolist() == pytest.approx([e[1] / 3 - alpha / sum(NC) for e in base], rel=1e-9)
    assert gr.tolist() == pytest.approx([e[2] / 3 for e in base], rel=1e-9)
    m = out.metrics()
    assert m["nll"] == pytest.approx(nll, rel=1e-9)
    assert m["loss"] == pytest.approx(total, rel=1e-6)


@pytest.mark.parametrize("rpo_alpha", [None, 0.5])
def test_micro_batch_split_gives_the_same_loss_gradient_and_metrics(rpo_alpha):
    cfg = DPOLossConfig(beta=BETA, rpo_alpha=rpo_alpha)
    full, gc, gr, _ = run(cfg)
    c = torch.tensor(C, dtype=torch.float64, requires_grad=True)
    r = torch.tensor(R, dtype=torch.float64, requires_grad=True)
    nc, nr = torch.tensor(NC), torch.tensor(NR)
    mean_nc = sum(NC) / 3  # the global batch's mean, as a trainer passes it
    sums, total = None, 0.0
    for idx in ([0, 2], [1]):
        i = torch.tensor(idx)
        part = dpo_loss(
            cfg, c[i], r[i], torch.tensor(C0)[i], torch.tensor(R0)[i], nc[i], nr[i],
            mean_chosen_tokens=mean_nc,
        )  # fmt: skip
        (part.losses.sum() / 3).backward()  # global pairs, as the schedule normalises
        total += part.losses.detach().sum().item() / 3
        s = part.metric_sums()
        sums = s if sums is None else {k: sums[k] + s[k] for k in s}
    assert total == pytest.approx(full.losses.mean().item(), rel=1e-12)
    assert torch.allclose(c.grad, gc) and torch.allclose(r.grad, gr)
    merged, whole = metrics_from_sums(sums), full.metrics()
    assert merged.keys() == whole.keys()
    for k in whole:
        assert merged[k] == pytest.approx(whole[k], rel=1e-9, abs=1e-12), k


def test_metrics_are_trl_definitions():
    out, *_ = run(DPOLossConfig(beta=BETA))
    m = out.metrics()
    rc = [BETA * (C[i] - C0[i]) for i in range(3)]
    rr = [BETA * (R[i] - R0[i]) for i in range(3)]
    assert m["rewards/chosen"] == pytest.approx(sum(rc) / 3)
    assert m["rewards/rejected"] == pytest.approx(sum(rr) / 3)
    assert m["rewards/margins"] == pytest.approx((sum(rc) - sum(rr)) / 3)
    assert m["rewards/accuracies"] == pytest.approx(sum(a > b for a, b in zip(rc, rr)) / 3)
    assert m["logps/chosen"] == pytest.approx(sum(C) / 3)
    assert m["logps/rejected"] == pytest.approx(sum(R) / 3)
    assert m["loss"] == pytest.approx(sum(e[0] for e in hand_sigmoid(0.0)) / 3, rel=1e-6)
    assert "nll" not in m


def test_ipo_rewards_are_not_length_normalised():
    out, *_ = run(DPOLossConfig(loss_type="ipo", beta=BETA))
    assert out.chosen_rewards.tolist() == pytest.approx([BETA * (C[i] - C0[i]) for i in range(3)])


@pytest.mark.parametrize("other", ["ipo", "hinge", "robust"])
def test_loss_type_reaches_the_loss(other):
    """ms-swift's Megatron path dropped loss_type, silently training hinge/IPO as sigmoid."""
    from omegaconf import OmegaConf

    # through the structured-config path a recipe uses (YAML override -> dataclass)
    merged = OmegaConf.merge(
        OmegaConf.structured(DPOLossConfig),
        OmegaConf.create(
            {"loss_type": other, "beta": BETA, "label_smoothing": 0.1 if other == "robust" else 0}
        ),
    )
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, DPOLossConfig) and cfg.loss_type == other
    sigmoid, *_ = run(DPOLossConfig(beta=BETA))
    variant, *_ = run(cfg)
    assert (variant.losses - sigmoid.losses).abs().min() > 1e-3, (variant.losses, sigmoid.losses)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust"])
def test_policy_equal_to_reference_gives_ln2_and_zero_rewards(loss_type):
    g = torch.Generator().manual_seed(0)
    lc, lr_ = -50 * torch.rand(16, generator=g), -50 * torch.rand(16, generator=g)
    c, r = lc.clone().requires_grad_(), lr_.clone().requires_grad_()
    eps = 0.1 if loss_type == "robust" else 0.0
    # the reference passed as the very same tensors, as a trainer without a copy would
    out = dpo_loss(DPOLossConfig(loss_type, beta=BETA, label_smoothing=eps), c, r, c, r)
    out.losses.mean().backward()
    # at h = 0 both sigmoid and rDPO reduce to -log σ(0) = ln 2
    assert torch.allclose(out.losses, torch.full((16,), math.log(2.0)), atol=1e-6)
    assert abs(out.losses.mean().item() - 0.693147) < 1e-5
    m = out.metrics()
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert m[k] == 0.0, k
    # dL/dc at h = 0 (mean over 16 pairs): sigmoid -β σ(0) / 16; rDPO -β σ(0) / (1-2ε) / 16
    slope = BETA * 0.5 if loss_type == "sigmoid" else BETA * 0.5 / (1 - 2 * eps)
    assert torch.allclose(c.grad, torch.full((16,), -slope / 16))


def test_ipo_and_rpo_need_token_counts_and_shapes_must_match():
    c = torch.zeros(2)
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(DPOLossConfig(loss_type="ipo"), c, c, c, c)
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(DPOLossConfig(rpo_alpha=1.0), c, c, c, c)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        dpo_loss(DPOLossConfig(), c, c)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(DPOLossConfig(), c, torch.zeros(3), c, c)
    with pytest.raises(ValueError, match=r"\[pairs\]"):
        dpo_loss(DPOLossConfig(), torch.zeros(2, 2), torch.zeros(2, 2), c, c)


def test_empty_batch_and_single_pair():
    e = torch.zeros(0)
    out = dpo_loss(DPOLossConfig(), e, e, e, e)
    assert out.losses.shape == (0,)
    with pytest.raises(ValueError, match="no pairs"):
        out.metrics()
    one = dpo_loss(DPOLossConfig(beta=1.0), *(torch.tensor([x]) for x in (-1.0, -3.0, -2.0, -2.0)))
    assert one.losses.item() == pytest.approx(-logsig(2.0))
    assert one.metrics()["rewards/accuracies"] == 1.0


def test_ipo_empty_answer_does_not_divide_by_zero():
    t = torch.tensor
    out = dpo_loss(DPOLossConfig(loss_type="ipo", beta=0.5), t([0.0]), t([-2.0]), t([0.0]),
                   t([-1.0]), t([0]), t([2]))  # fmt: skip
    assert torch.isfinite(out.losses).all()
    assert out.losses.item() == pytest.approx((0.0 - (-1.0) / 2 - 1.0) ** 2)


def test_low_precision_inputs_are_computed_in_fp32():
    c = torch.tensor(C, dtype=torch.bfloat16, requires_grad=True)
    r = torch.tensor(R, dtype=torch.bfloat16)
    out = dpo_loss(DPOLossConfig(beta=BETA), c, r, torch.tensor(C0), torch.tensor(R0))
    assert out.losses.dtype == torch.float32
    out.losses.sum().backward()
    assert c.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"loss_type": "kto"}, r"dpo.loss_type='kto' is not one of \['sigmoid', 'ipo', 'hinge'"),
        ({"loss_type": "IPO"}, "is not one of"),
        ({"beta": 0.0}, "dpo.beta=0.0 must be"),
        ({"beta": -1}, "dpo.beta=-1"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "no meaning for dpo.loss_type=ipo"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "no meaning"),
        ({"label_smoothing": 0.6}, r"\[0, 0.5\] for sigmoid"),
        ({"label_smoothing": -0.1}, r"\[0, 0.5\]"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, r"\[0, 0.5\) for robust"),
        ({"rpo_alpha": -1.0}, "dpo.rpo_alpha=-1.0 must be >= 0"),
    ],
)
def test_bad_config_values_are_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match) as ei:
        DPOLossConfig(**kw)
    assert isinstance(ei.value, UserError)


def test_defaults_are_trl_defaults():
    cfg = DPOLossConfig()
    assert (cfg.loss_type, cfg.beta, cfg.label_smoothing, cfg.rpo_alpha, cfg.reference_free) == (
        "sigmoid",
        0.1,
        0.0,
        None,
        False,
    )
    assert not cfg.needs_token_counts
    assert DPOLossConfig(loss_type="ipo").needs_token_counts
    assert DPOLossConfig(rpo_alpha=1.0).needs_token_counts


# ---------------------------------------------------------------------------------------------
# Parity with TRL's own DPOTrainer loss code (optional: skipped when trl is not installed).
# ---------------------------------------------------------------------------------------------


def _trl_compute_loss(loss_types, loss_weights, beta, label_smoothing, per_token, inputs):
    """Run TRL's own ``DPOTrainer._compute_loss`` (TRL 1.x has no standalone ``dpo_loss``) on
    given per-token log-probs: a stand-in model returns them, the trainer is a namespace with
    just the attributes that method reads, and the reference log-probs come precomputed."""
    from collections import defaultdict

    from trl import DPOTrainer

    class FakeModel:
        training = True

        def __call__(self, **kw):
            z = torch.zeros_like(per_token)
            return SimpleNamespace(
                log_probs=per_token, entropy=z, mean_logits=z, is_top1=z.bool(), aux_loss=None
            )

    acc = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x)
    acc.gather_for_metrics = lambda x: x
    model = FakeModel()
    trainer = SimpleNamespace(
        model=model, accelerator=acc, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=loss_types,
        loss_weights=loss_weights, beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0,
        _tp_size=1, args=SimpleNamespace(),
    )  # fmt: skip
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


TRL_CASES = [
    # (ours, TRL loss_type list, TRL loss_weights, TRL label_smoothing)
    (DPOLossConfig(beta=0.1), ["sigmoid"], [1.0], 0.0),
    (DPOLossConfig(loss_type="ipo", beta=0.3), ["ipo"], [1.0], 0.0),
    (DPOLossConfig(loss_type="hinge", beta=0.2), ["hinge"], [1.0], 0.0),
    (DPOLossConfig(loss_type="robust", beta=0.1, label_smoothing=0.2), ["robust"], [1.0], 0.2),
    (DPOLossConfig(beta=0.1, rpo_alpha=0.5), ["sigmoid", "sft"], [1.0, 0.5], 0.0),
    (DPOLossConfig(loss_type="ipo", beta=0.2, rpo_alpha=1.0), ["ipo", "sft"], [1.0, 1.0], 0.0),
]


@pytest.mark.parametrize("case", range(len(TRL_CASES)), ids=[str(c[1]) for c in TRL_CASES])
@pytest.mark.parametrize("reference_free", [False, True])
def test_matches_trl_dpo_trainer(case, reference_free):
    pytest.importorskip("trl", minversion="1.16")  # 0.x computed the loss elsewhere
    ours, types, weights, ls = TRL_CASES[case]
    ours = DPOLossConfig(**{**vars(ours), "reference_free": reference_free})
    g = torch.Generator().manual_seed(case)
    B, T = 5, 12  # pairs, completion positions (after the shift)
    # completion mask over input ids: the first position is always prompt, answers vary
    cmask = torch.zeros(2 * B, T + 1, dtype=torch.long)
    for i in range(2 * B):
        start = int(torch.randint(1, 5, (1,), generator=g))
        end = int(torch.randint(start + 1, T + 2, (1,), generator=g))
        cmask[i, start:end] = 1
    smask = cmask[:, 1:]
    # TRL's fused head returns 0 log-prob at label -100: only completion tokens count
    raw = (-4 * torch.rand(2 * B, T, generator=g, dtype=torch.float64)).requires_grad_()
    ref = -40 * torch.rand(2 * B, generator=g, dtype=torch.float64)
    if reference_free:  # TRL 1.x has no reference_free: a zero reference is the same thing
        ref = torch.zeros_like(ref)
    inputs = {
        "input_ids": torch.randint(0, 100, (2 * B, T + 1), generator=g),
        "attention_mask": torch.ones(2 * B, T + 1, dtype=torch.long),
        "completion_mask": cmask,
        "ref_chosen_logps": ref[:B],
        "ref_rejected_logps": ref[B:],
    }
    trl_loss, trl_m = _trl_compute_loss(types, weights, ours.beta, ls, raw * smask, inputs)
    (trl_grad,) = torch.autograd.grad(trl_loss, raw)

    sums, counts = (raw * smask).sum(1), smask.sum(1)
    out = dpo_loss(ours, sums[:B], sums[B:], ref[:B], ref[B:], counts[:B], counts[B:])
    loss = out.losses.mean()
    (grad,) = torch.autograd.grad(loss, raw)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-6)
    assert torch.allclose(grad.double(), trl_grad, rtol=1e-5, atol=1e-9)
    m = out.metrics()
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
              "logps/chosen", "logps/rejected"):  # fmt: skip
        assert m[k] == pytest.approx(trl_m[k], rel=1e-5, abs=1e-9), k
