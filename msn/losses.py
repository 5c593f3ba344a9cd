"""The MSN objective (Assran et al., 2022, Sec. 3): prototype cross-entropy + ME-MAX, or
PMSN's KL term to a power-law prior (Assran et al., ICLR 2023) with ``prior="power_law"``.

Functional API::

    out = msn_loss(anchor, target, prototypes)   # anchor [V*B, D] view-major, target [B, D]
    out.loss.backward()

Every quantity is computed in at least float32, whatever the dtype of the inputs, and also
when called inside an autocast region (autocast is switched off for the loss), like the
reference, which computes everything in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from msn import distributed
from msn.config import PRIORS, LossConfig  # the defaults below are the schema's (one home)


@dataclass
class MSNLossOutput:
    """Result of :func:`msn_loss`.

    Attributes:
        loss: ``ce + memax_weight * memax + entropy_weight * entropy`` (scalar, differentiable).
        ce: mean cross-entropy between targets and anchor predictions (eq. 2).
        memax: the prototype-prior regulariser ``KL(pbar || prior)`` (>= 0): ME-MAX
            ``sum_k pbar_k log pbar_k + log K`` for ``prior="uniform"`` (eq. 3), PMSN's
            ``sum_k pbar_k log(pbar_k / pi_k)`` for ``prior="power_law"``.
        entropy: mean per-prediction entropy (weight 0 in the paper; logged).
        targets: the (sharpened, optionally Sinkhorn-balanced) targets repeated per view, [V*B, K].
        num_targets_used: number of distinct argmax prototypes among the targets (``np``).
        max_target: mean over images of the largest target probability (``max_t``).
        min_target: mean over images of the smallest target probability (``min_t``, the
            reference's statistic).
        min_max_target: smallest per-image largest target probability (``min_max_t``: the
            least confident target of the batch).
        target_rank: RankMe of the batch's target embeddings (:func:`effective_rank`), set by
            the train step on the steps it logs; ``None`` otherwise.
    """

    loss: torch.Tensor
    ce: torch.Tensor
    memax: torch.Tensor
    entropy: torch.Tensor
    targets: torch.Tensor
    num_targets_used: torch.Tensor
    max_target: torch.Tensor
    min_target: torch.Tensor
    min_max_target: torch.Tensor
    target_rank: Optional[torch.Tensor] = None


#: RankMe's epsilon (Garrido et al., 2023): added to every normalised singular value.
RANK_EPS = 1e-7


@torch.no_grad()
def effective_rank(embeddings: torch.Tensor, eps: float = RANK_EPS) -> torch.Tensor:
    """RankMe (Garrido et al., ICML 2023) of ``embeddings`` [N, D], its rows L2-normalised
    first (the loss sees only directions): ``exp(-sum_k p_k log p_k)`` with
    ``p_k = s_k / sum_j s_j + eps`` for the singular values ``s``. Between about 1 (all rows
    on one line) and ``min(N, D)`` (orthogonal rows of equal norm); docs/method.md Sec. 5.

    One SVD, in at least float32, without gradient; on CUDA it waits for the device.
    """
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"effective_rank expects a non-empty 2-D [N, D] matrix, got shape {tuple(embeddings.shape)}")
    dtype = torch.promote_types(embeddings.dtype, torch.float32)
    with torch.autocast(embeddings.device.type, enabled=False):
        singular = torch.linalg.svdvals(F.normalize(embeddings.detach().to(dtype), dim=-1))
        p = singular / singular.sum().clamp_min(torch.finfo(dtype).tiny) + eps
        return torch.exp(-torch.sum(p * torch.log(p)))


def prototype_logits(z: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cosine similarities to the L2-normalised prototypes, divided by ``temperature``."""
    return F.normalize(z, dim=-1) @ F.normalize(prototypes, dim=-1).T / temperature


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``p_k^(1/T) / sum_j p_j^(1/T)`` along the last dimension (paper eq. 1)."""
    sharp = probs ** (1.0 / temperature)
    return sharp / sharp.sum(dim=-1, keepdim=True)


def power_law_log_prior(num_prototypes: int, exponent: float, dtype: torch.dtype = torch.float64,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """``log pi_k`` of the power-law prior ``pi_k = k^(-exponent) / sum_j j^(-exponent)``,
    ``k = 1..K`` in the prototypes' index order (PMSN; docs/method.md Sec. 5, "PMSN").

    Computed in float64, then cast to ``dtype``. ``exponent=0`` is the uniform prior.
    """
    k = torch.arange(1, num_prototypes + 1, dtype=torch.float64, device=device)
    log_weights = -exponent * torch.log(k)
    return (log_weights - torch.logsumexp(log_weights, dim=0)).to(dtype)


def prior_regulariser(mean_probs: torch.Tensor, prior: str = LossConfig.prior,
                      exponent: float = LossConfig.prior_exponent) -> torch.Tensor:
    """``KL(mean_probs || prior)`` for a mean prediction ``mean_probs`` [K].

    ``prior="uniform"`` gives ME-MAX, ``sum_k pbar_k log pbar_k + log K``; ``"power_law"``
    gives PMSN's ``sum_k pbar_k (log pbar_k - log pi_k)`` (:func:`power_law_log_prior`).
    """
    if prior == "uniform":
        return torch.sum(mean_probs * torch.log(mean_probs)) + math.log(mean_probs.numel())
    if prior == "power_law":
        log_prior = power_law_log_prior(mean_probs.numel(), exponent, mean_probs.dtype, mean_probs.device)
        return torch.sum(mean_probs * (torch.log(mean_probs) - log_prior))
    raise ValueError(f"prior must be one of {list(PRIORS)}, got {prior!r}")


@torch.no_grad()
def sinkhorn(probs: torch.Tensor, num_iters: int = 3) -> torch.Tensor:
    """Balance targets over prototypes with Sinkhorn-Knopp (SwAV-style, MSN reference).

    Works on ``Q = probs.T`` [K, B]: divide by the global sum, then ``num_iters`` times make
    every prototype row sum to ``1/K`` and every image column sum to ``1/B_global``; finally
    scale by ``B_global`` so each image's row sums to one. Row sums and the total are
    all-reduced over ranks; column sums are per image and stay local.

    Args:
        probs: [B, K] non-negative target probabilities of the local batch.
        num_iters: number of row/column normalisation rounds.

    Returns:
        [B, K] balanced assignment, rows summing to one.
    """
    q = probs.T.clone()
    num_prototypes = q.shape[0]
    global_batch = q.shape[1] * distributed.world_size()
    tiny = torch.finfo(q.dtype).tiny
    total = distributed.all_reduce_sum_(q.sum())
    q /= total
    for _ in range(num_iters):
        row_sums = distributed.all_reduce_sum_(q.sum(dim=1, keepdim=True))
        q /= row_sums.clamp_min(tiny) * num_prototypes
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny) * global_batch
    q *= global_batch
    return q.T


def msn_loss(
    anchor: torch.Tensor,
    target: torch.Tensor,
    prototypes: torch.Tensor,
    *,
    temperature: float = LossConfig.temperature,
    sharpen_temperature: float = LossConfig.sharpen_start,
    use_sinkhorn: bool = LossConfig.use_sinkhorn,
    sinkhorn_iters: int = LossConfig.sinkhorn_iters,
    memax_weight: float = LossConfig.memax_weight,
    entropy_weight: float = LossConfig.entropy_weight,
    prior: str = LossConfig.prior,
    prior_exponent: float = LossConfig.prior_exponent,
) -> MSNLossOutput:
    """MSN loss for one batch (paper Sec. 3, eqs. 1-3; docs/method.md Sec. 5).

    Args:
        anchor: [V*B, D] projections of the anchor and focal views, view-major
            (all B images of view 0, then view 1, ...).
        target: [B, D] projections of the target view (no gradient flows into it).
        prototypes: [K, D] learnable prototypes (normalised here, gradients flow).
        temperature: softmax temperature tau of the anchor and target predictions.
        sharpen_temperature: target sharpening temperature T.
        use_sinkhorn: balance the targets with Sinkhorn-Knopp.
        sinkhorn_iters: Sinkhorn rounds.
        memax_weight: weight lambda of the prior regulariser (ME-MAX, or PMSN's KL term).
        entropy_weight: weight of the mean per-prediction entropy.
        prior: ``"uniform"`` (ME-MAX, MSN) or ``"power_law"`` (PMSN: ``KL(pbar || pi)``,
            ``pi_k`` proportional to ``k^(-prior_exponent)``); :func:`prior_regulariser`.
        prior_exponent: the power-law exponent tau (``prior="power_law"`` only).

    Returns:
        A :class:`MSNLossOutput`.
    """
    if anchor.ndim != 2 or target.ndim != 2 or prototypes.ndim != 2:
        raise ValueError("msn_loss expects 2-D anchor [V*B, D], target [B, D] and prototypes [K, D]")
    batch = target.shape[0]
    if batch == 0 or anchor.shape[0] % batch != 0:
        raise ValueError(f"anchor rows ({anchor.shape[0]}) must be a multiple of target rows ({batch})")
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {list(PRIORS)}, got {prior!r}")
    with torch.autocast(anchor.device.type, enabled=False):
        return _msn_loss(anchor, target, prototypes, batch, temperature, sharpen_temperature, use_sinkhorn,
                         sinkhorn_iters, memax_weight, entropy_weight, prior, prior_exponent)


def _msn_loss(anchor, target, prototypes, batch, temperature, sharpen_temperature, use_sinkhorn, sinkhorn_iters,
              memax_weight, entropy_weight, prior, prior_exponent) -> MSNLossOutput:
    num_views = anchor.shape[0] // batch
    dtype = torch.promote_types(torch.promote_types(anchor.dtype, prototypes.dtype), torch.float32)
    anchor, target, prototypes = anchor.to(dtype), target.to(dtype), prototypes.to(dtype)

    log_probs = F.log_softmax(prototype_logits(anchor, prototypes, temperature), dim=1)
    probs = log_probs.exp()

    with torch.no_grad():
        target_probs = F.softmax(prototype_logits(target.detach(), prototypes.detach(), temperature), dim=1)
        targets = sharpen(target_probs, sharpen_temperature)
        if use_sinkhorn:
            targets = sinkhorn(targets, sinkhorn_iters)
        targets = targets.repeat(num_views, 1)

    ce = torch.sum(-targets * log_probs, dim=1).mean()

    mean_probs = distributed.all_reduce_mean(probs.mean(dim=0))  # global over ranks, for either prior
    memax = prior_regulariser(mean_probs, prior, prior_exponent)

    entropy = torch.sum(-probs * log_probs, dim=1).mean()

    loss = ce + memax_weight * memax + entropy_weight * entropy

    with torch.no_grad():
        per_image = targets[:batch]
        used = torch.zeros(per_image.shape[1], device=per_image.device)
        used[per_image.argmax(dim=1)] = 1.0
        max_per_image = per_image.max(dim=1).values
    return MSNLossOutput(
        loss=loss,
        ce=ce,
        memax=memax,
        entropy=entropy,
        targets=targets,
        num_targets_used=used.sum(),
        max_target=max_per_image.mean(),
        min_target=per_image.min(dim=1).values.mean(),
        min_max_target=max_per_image.min(),
    )
