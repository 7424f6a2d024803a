"""DPO and its variants as one pure function of sequence log-probabilities.

Input: per-pair summed log-probs of the chosen and rejected answers under the policy and the
frozen reference (and the answers' supervised token counts where a variant needs them). Output:
the loss of every pair and the metrics TRL's ``DPOTrainer`` logs. No model, no data, no
distributed code: the megatron-core recipe and the TRL engine both call into the same maths.

Notation (per pair): ``c``/``r`` are the policy's summed log-probs of the chosen/rejected answer,
``c0``/``r0`` the reference's, ``n_c``/``n_r`` their token counts, and the implicit reward
margin is ``h = (c - c0) - (r - r0)``.

=========  =====================================================================  ===============
loss_type  per-pair loss                                                          source
=========  =====================================================================  ===============
sigmoid    ``-(1-ε)·log σ(β h) - ε·log σ(-β h)``  (ε = label_smoothing)          DPO eq. 7; cDPO
ipo        ``(h̄ - 1/(2β))²`` with ``h̄ = (c-c0)/n_c - (r-r0)/n_r``                 IPO eq. 17, TRL
hinge      ``max(0, 1 - β h)``                                                    SLiC via TRL
robust     ``(-(1-ε)·log σ(β h) + ε·log σ(-β h)) / (1-2ε)``                        rDPO eq. 8
=========  =====================================================================  ===============

Plus, with ``rpo_alpha = α``, the RPO term ``α · NLL`` where NLL is the policy's negative
log-likelihood of the chosen answers averaged over their tokens. Where the definitions in the
papers and TRL differ, this module follows TRL (``trl`` 1.x, ``DPOTrainer._compute_loss``) so
the two engines agree; each difference is stated in :func:`dpo_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sfmed.config.dpo import LOSS_TYPES, DPOLossConfig
from sfmed.core.errors import ConfigError

# Metric names as TRL's DPOTrainer logs them (``nll`` only when rpo_alpha is set).
METRIC_NAMES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


@dataclass
class DPOLossOutput:
    """Per-pair results of :func:`dpo_loss` (all tensors ``[pairs]``).

    ``losses`` carries the gradient; everything else is detached and only feeds the metrics.
    """

    losses: torch.Tensor
    """Loss of each pair, RPO share included; its mean over the batch is the training loss."""

    chosen_rewards: torch.Tensor
    """β (c - c0), TRL's ``rewards/chosen`` (never length-normalised, even for IPO)."""

    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    """The policy's summed log-probs of the chosen answers (``logps/chosen``)."""

    rejected_logps: torch.Tensor
    chosen_nll_sum: torch.Tensor | None = None
    """-c per pair with rpo_alpha set: the NLL numerator (``nll`` = its sum / chosen tokens)."""

    chosen_tokens: torch.Tensor | None = None

    def metric_sums(self) -> dict[str, torch.Tensor]:
        """Sums over this batch's pairs, to add up across micro-batches and all-reduce across
        data-parallel ranks before :func:`metrics_from_sums` turns them into means."""
        sums = {
            "loss": self.losses.detach().float().sum(),
            "rewards/chosen": self.chosen_rewards.sum(),
            "rewards/rejected": self.rejected_rewards.sum(),
            "rewards/margins": (self.chosen_rewards - self.rejected_rewards).sum(),
            "rewards/accuracies": (self.chosen_rewards > self.rejected_rewards).float().sum(),
            "logps/chosen": self.chosen_logps.sum(),
            "logps/rejected": self.rejected_logps.sum(),
            "pairs": torch.tensor(float(self.losses.numel()), device=self.losses.device),
        }
        if self.chosen_nll_sum is not None:
            sums["nll"] = self.chosen_nll_sum.sum()
            sums["chosen_tokens"] = self.chosen_tokens.float().sum()
        return sums

    def metrics(self) -> dict[str, float]:
        """TRL's logged metrics for this batch alone (means over its pairs)."""
        return metrics_from_sums(self.metric_sums())


def metrics_from_sums(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Means from (possibly all-reduced) :meth:`DPOLossOutput.metric_sums`.

    Pair metrics are means over pairs, as TRL gathers them; ``nll`` is the per-token mean over
    all chosen tokens, as TRL computes it.
    """
    pairs = float(sums["pairs"])
    if pairs <= 0:
        raise ValueError("metrics_from_sums: no pairs were summed")
    out = {k: float(sums[k]) / pairs for k in ("loss", *METRIC_NAMES)}
    if "nll" in sums:
        out["nll"] = float(sums["nll"]) / max(float(sums["chosen_tokens"]), 1.0)
    return out


def _check_1d(name: str, t: torch.Tensor | None, like: torch.Tensor) -> None:
    if t is None:
        raise ValueError(f"dpo_loss: {name} is required")
    if t.shape != like.shape:
        raise ValueError(
            f"dpo_loss: {name} has shape {tuple(t.shape)}, expected {tuple(like.shape)} "
            "(one value per pair)"
        )


def dpo_loss(
    cfg: DPOLossConfig,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    *,
    mean_chosen_tokens: float | torch.Tensor | None = None,
) -> DPOLossOutput:
    """The preference loss of every pair and TRL's metrics.

    Args:
        cfg: the variant and its constants.
        policy_chosen_logps, policy_rejected_logps: ``[pairs]`` summed log-probs of each answer
            under the policy (the gradient flows through these).
        ref_chosen_logps, ref_rejected_logps: ``[pairs]`` the same under the reference; treated
            as constants (detached). Ignored, and may be ``None``, with ``reference_free``.
        chosen_tokens, rejected_tokens: ``[pairs]`` supervised token counts of each answer
            (the number of terms in the sums). Required for ``ipo`` (both) and ``rpo_alpha``
            (chosen).
        mean_chosen_tokens: with ``rpo_alpha``, the mean chosen-answer token count over the
            batch the NLL is averaged over. Default: this call's pairs, which is what TRL does
            per device micro-batch. A trainer that cuts a global batch into micro-batches or
            data-parallel ranks and wants the loss independent of the cut passes the global
            value; ``sum(losses) / global pairs`` is then the same for any cut.

    Definitions, where paper and TRL differ (this module follows TRL 1.x):

    * ``ipo``: the IPO paper (Azar et al. 2023, eq. 17) squares the margin of *summed*
      log-ratios; TRL divides each answer's log-ratio by its token count first (confirmed with
      the IPO authors, per TRL's source), so β is comparable across lengths. This module does
      the same: ``h̄ = (c - c0)/n_c - (r - r0)/n_r``. The rewards reported stay un-normalised
      ``β (c - c0)``, as in TRL 1.x (TRL 0.x reported normalised ones).
    * ``sigmoid`` with ``label_smoothing`` ε is conservative DPO (Mitchell 2023), as TRL 0.x
      implemented it. TRL 1.x no longer applies ``label_smoothing`` to ``sigmoid`` (only to
      ``robust``, ``exo_pair``, ``aot``); with ε > 0 there is no TRL 1.x counterpart.
    * ``hinge``: TRL's ``max(0, 1 - β h)`` with the reference in ``h``; SLiC-HF's calibration
      loss ``max(0, δ - (c - r))`` is the reference-free form with δ = 1/β, scaled by β.
    * ``robust``: rDPO (Chowdhury et al. 2024, eq. 8), identical in TRL.
    * ``rpo_alpha``: the RPO paper (Pang et al. 2024, v3) adds α × the NLL of each chosen
      sequence divided by its own length (prompt included); TRL — and this module — adds
      α × the mean NLL over all chosen-answer tokens of the batch (TRL 0.x: ``rpo_alpha``;
      TRL 1.x: ``loss_type=["sigmoid", "sft"], loss_weights=[1, α]``). Per pair that is
      ``α · (-c) / mean_chosen_tokens``, whose batch mean is exactly that token mean.
    * ``reference_free``: TRL 0.x's option; the reference log-probs are taken as 0, so
      ``h = c - r`` and the rewards are ``β c``, ``β r``.

    Rewards, accuracies (strict ``>``: ties count as wrong) and logps are reported as TRL does.
    """
    c = policy_chosen_logps
    if c.dim() != 1:
        raise ValueError(f"dpo_loss: expected [pairs] log-probs, got shape {tuple(c.shape)}")
    _check_1d("policy_rejected_logps", policy_rejected_logps, c)
    # A handful of numbers per pair: at least fp32, whatever precision the model ran in.
    dtype = torch.promote_types(c.dtype, torch.float32)
    c = c.to(dtype)
    r = policy_rejected_logps.to(dtype)
    if cfg.reference_free:
        c0 = r0 = torch.zeros_like(c)
    else:
        _check_1d("ref_chosen_logps (or set reference_free)", ref_chosen_logps, c)
        _check_1d("ref_rejected_logps (or set reference_free)", ref_rejected_logps, c)
        c0 = ref_chosen_logps.detach().to(dtype)
        r0 = ref_rejected_logps.detach().to(dtype)

    chosen_logratios = c - c0
    rejected_logratios = r - r0
    h = chosen_logratios - rejected_logratios
    beta, eps = float(cfg.beta), float(cfg.label_smoothing)

    if cfg.loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h)
        if eps:
            losses = losses - eps * F.logsigmoid(-beta * h)
    elif cfg.loss_type == "ipo":
        _check_1d("chosen_tokens (ipo normalises by length)", chosen_tokens, c)
        _check_1d("rejected_tokens (ipo normalises by length)", rejected_tokens, c)
        # clamp like TRL: an empty answer (dropped upstream anyway) must not divide by zero
        h_avg = chosen_logratios / chosen_tokens.to(c.dtype).clamp(min=1.0) - (
            rejected_logratios / rejected_tokens.to(c.dtype).clamp(min=1.0)
        )
        losses = (h_avg - 1 / (2 * beta)) ** 2
    elif cfg.loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif cfg.loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (
            1 - 2 * eps
        )
    else:  # unreachable after DPOLossConfig validation, unless mutated afterwards
        raise ConfigError(f"dpo.loss_type={cfg.loss_type!r} is not one of {list(LOSS_TYPES)}")

    nll_sum = n_c = None
    if cfg.rpo_alpha is not None:
        _check_1d("chosen_tokens (rpo_alpha normalises per token)", chosen_tokens, c)
        n_c = chosen_tokens.detach()
        if mean_chosen_tokens is None:
            mean_chosen_tokens = n_c.to(c.dtype).mean()
        denom = torch.as_tensor(mean_chosen_tokens, dtype=c.dtype, device=c.device).clamp(min=1.0)
        losses = losses + float(cfg.rpo_alpha) * (-c) / denom
        nll_sum = (-c).detach()

    return DPOLossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
        chosen_logps=c.detach(),
        rejected_logps=r.detach(),
        chosen_nll_sum=nll_sum,
        chosen_tokens=n_c,
    )
