"""Supervised depth losses. All take ``pred`` and ``target`` ``Bx1xHxW`` in metres and a boolean valid mask.

Targets mark invalid pixels with NaN or 0 (REP 118 / RealSense); build the mask with ``valid_mask``. Every loss
returns a scalar that is 0 (and still has a grad path to ``pred``) when no pixel is valid, never NaN.
"""

from __future__ import annotations

import torch
from torch import nn

_EPS = 1e-6


def valid_mask(target: torch.Tensor, min_depth: float = 1e-3, max_depth: float = float("inf")) -> torch.Tensor:
    """Boolean mask of pixels with a finite target in ``(min_depth, max_depth]``."""
    return torch.isfinite(target) & (target > min_depth) & (target <= max_depth)


def _zero_like(pred: torch.Tensor) -> torch.Tensor:
    # keeps pred in the graph so backward() works and gives zero gradients
    return pred.sum() * 0.0


def _check(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
    if pred.shape != target.shape or pred.shape != mask.shape:
        raise ValueError(
            f"pred, target and mask must have the same shape, got {tuple(pred.shape)}, "
            f"{tuple(target.shape)}, {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be boolean, got {mask.dtype}")


def _safe_sqrt(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """sqrt with a finite gradient at 0: linear (matching value at ``eps``) below ``eps``, exact 0 at 0."""
    x = x.clamp(min=0.0)
    return torch.where(x > eps, torch.sqrt(x.clamp(min=eps)), x / eps**0.5)


def silog_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, variance_focus: float = 0.85
) -> torch.Tensor:
    """Scale-invariant log loss (Eigen et al. 2014), in the BTS form ``10 * sqrt(mean(d^2) - lambda * mean(d)^2)``.

    ``d = log(pred) - log(target)`` over valid pixels, computed per image and averaged over images that have
    valid pixels. ``variance_focus`` (lambda) = 1 is fully scale-invariant; 0.85 (BTS) also penalises a wrong
    global scale a little. The x10 only rescales it to the range BTS/AdaBins report.
    """
    _check(pred, target, mask)
    safe_target = torch.where(mask, target, torch.ones_like(target))
    d = torch.where(mask, torch.log(pred.clamp(min=_EPS)) - torch.log(safe_target), torch.zeros_like(pred))
    dims = tuple(range(1, pred.ndim))
    count = mask.sum(dim=dims)
    has_valid = count > 0
    if not bool(has_valid.any()):
        return _zero_like(pred)
    n = count.clamp(min=1).to(pred.dtype)
    mean_d = d.sum(dim=dims) / n
    mean_d2 = (d * d).sum(dim=dims) / n
    per_image = 10.0 * _safe_sqrt(mean_d2 - variance_focus * mean_d * mean_d)
    return per_image[has_valid].mean()


def l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error in metres over valid pixels of the batch."""
    _check(pred, target, mask)
    if not bool(mask.any()):
        return _zero_like(pred)
    return (pred[mask] - target[mask]).abs().mean()


def berhu_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, c_frac: float = 0.2) -> torch.Tensor:
    """Reverse Huber (Laina et al. 2016): L1 below ``c``, ``(x^2 + c^2) / 2c`` above, ``c = c_frac * max|x|``.

    ``c`` is taken over the valid pixels of the whole batch and not differentiated through.
    """
    _check(pred, target, mask)
    if not bool(mask.any()):
        return _zero_like(pred)
    diff = (pred[mask] - target[mask]).abs()
    c = (c_frac * diff.max()).detach().clamp(min=_EPS)
    return torch.where(diff <= c, diff, (diff * diff + c * c) / (2.0 * c)).mean()


def log_l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean ``|log(pred) - log(target)|`` over the valid pixels of the batch: a metric (not scale-invariant) term
    that weighs near and far pixels alike by their relative error, unlike L1 in metres, which far pixels dominate."""
    _check(pred, target, mask)
    if not bool(mask.any()):
        return _zero_like(pred)
    return (torch.log(pred[mask].clamp(min=_EPS)) - torch.log(target[mask])).abs().mean()


def rel_l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean ``|pred - target| / target`` over the valid pixels of the batch (absrel as a loss).

    Unlike ``log_l1`` it is not symmetric in the ratio: a prediction twice too far costs 1, one half as far 0.5, so
    where the network cannot tell the scale (a forest unlike its training forests) it leans towards nearer depth,
    which absrel, the figure most depth work reports, rewards.
    """
    _check(pred, target, mask)
    if not bool(mask.any()):
        return _zero_like(pred)
    return ((pred[mask] - target[mask]).abs() / target[mask]).mean()


def gradient_matching_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, scales: int = 4
                           ) -> torch.Tensor:
    """Multi-scale gradient matching of log depth (MiDaS, Ranftl et al. 2020; Li and Snavely 2018).

    ``r = log(pred) - log(target)``; at each of ``scales`` scales (every 1st, 2nd, 4th, 8th pixel) the mean of
    ``|r(x+1) - r(x)| + |r(y+1) - r(y)|`` over neighbour pairs that are both valid. Invariant to the global scale,
    it asks for depth edges and slopes where the target has them (trunks against the ground, the ground's
    slope), which the depth of a camera at another height or field of view keeps.
    """
    _check(pred, target, mask)
    if not bool(mask.any()):
        return _zero_like(pred)
    safe_target = torch.where(mask, target, torch.ones_like(target))
    residual = torch.where(mask, torch.log(pred.clamp(min=_EPS)) - torch.log(safe_target), torch.zeros_like(pred))
    total = _zero_like(pred)
    used = 0
    for k in range(scales):
        step = 2**k
        r, m = residual[..., ::step, ::step], mask[..., ::step, ::step]
        pairs_x, pairs_y = m[..., :, 1:] & m[..., :, :-1], m[..., 1:, :] & m[..., :-1, :]
        count = pairs_x.sum() + pairs_y.sum()
        if int(count) == 0:
            continue
        grad_x = (r[..., :, 1:] - r[..., :, :-1]).abs() * pairs_x
        grad_y = (r[..., 1:, :] - r[..., :-1, :]).abs() * pairs_y
        total = total + (grad_x.sum() + grad_y.sum()) / count
        used += 1
    return total / max(used, 1)


def edge_aware_smoothness(depth: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Edge-aware smoothness of mean-normalised inverse depth (monodepth2), weighted by ``exp(-|image grad|)``.

    ``depth`` ``Bx1xHxW`` (metres, > 0), ``image`` ``BxCxHxW`` at the same size (normalised or [0, 1]).
    """
    if depth.shape[0] != image.shape[0] or depth.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"depth and image must share batch and HxW, got {tuple(depth.shape)} and {tuple(image.shape)}")
    disp = 1.0 / depth.clamp(min=_EPS)
    disp = disp / (disp.mean(dim=(2, 3), keepdim=True) + 1e-7)
    grad_disp_x = (disp[:, :, :, :-1] - disp[:, :, :, 1:]).abs()
    grad_disp_y = (disp[:, :, :-1, :] - disp[:, :, 1:, :]).abs()
    grad_img_x = (image[:, :, :, :-1] - image[:, :, :, 1:]).abs().mean(1, keepdim=True)
    grad_img_y = (image[:, :, :-1, :] - image[:, :, 1:, :]).abs().mean(1, keepdim=True)
    return (grad_disp_x * torch.exp(-grad_img_x)).mean() + (grad_disp_y * torch.exp(-grad_img_y)).mean()


class DepthLoss(nn.Module):
    """Weighted sum of the terms in ``TERMS``; ``forward`` returns ``(total, parts)``.

    Terms with weight 0 are skipped. ``parts`` holds the unweighted, detached value of each term used.
    The mask defaults to ``valid_mask(target, min_depth, max_depth)``; smoothness needs ``image``.
    ``variance_focus`` is silog's lambda: ``1 - variance_focus`` weighs the global scale error inside silog.
    """

    TERMS = ("silog", "berhu", "l1", "log_l1", "rel_l1", "gradient", "smooth")

    def __init__(
        self,
        silog: float = 1.0,
        berhu: float = 0.0,
        l1: float = 0.0,
        smooth: float = 0.001,
        min_depth: float = 0.1,
        max_depth: float = 20.0,
        variance_focus: float = 0.85,
        log_l1: float = 0.0,
        gradient: float = 0.0,
        gradient_scales: int = 4,
        rel_l1: float = 0.0,
    ) -> None:
        super().__init__()
        weights = {"silog": silog, "berhu": berhu, "l1": l1, "log_l1": log_l1, "rel_l1": rel_l1,
                   "gradient": gradient, "smooth": smooth}
        negative = {k: v for k, v in weights.items() if v < 0}
        if negative:
            raise ValueError(f"loss weights must be >= 0, got {negative}")
        if not 0.0 <= variance_focus <= 1.0:
            raise ValueError(f"variance_focus (silog lambda) must be within [0, 1], got {variance_focus}")
        self.weights = weights
        self.min_depth = min_depth
        self.max_depth = max_depth
        self.variance_focus = variance_focus
        self.gradient_scales = int(gradient_scales)

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        image: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its unweighted parts."""
        if mask is None:
            mask = valid_mask(target, self.min_depth, self.max_depth)
        terms = {
            "silog": lambda: silog_loss(pred, target, mask, self.variance_focus),
            "berhu": lambda: berhu_loss(pred, target, mask),
            "l1": lambda: l1_loss(pred, target, mask),
            "log_l1": lambda: log_l1_loss(pred, target, mask),
            "rel_l1": lambda: rel_l1_loss(pred, target, mask),
            "gradient": lambda: gradient_matching_loss(pred, target, mask, self.gradient_scales),
        }
        total = _zero_like(pred)
        parts: dict[str, torch.Tensor] = {}
        for name, compute in terms.items():
            if self.weights[name] > 0:
                value = compute()
                total = total + self.weights[name] * value
                parts[name] = value.detach()
        if self.weights["smooth"] > 0 and image is not None:
            value = edge_aware_smoothness(pred, image)
            total = total + self.weights["smooth"] * value
            parts["smooth"] = value.detach()
        return total, parts

    def extra_repr(self) -> str:
        """Show the weights in ``print(loss)``."""
        return ", ".join(f"{k}={v}" for k, v in self.weights.items()) + f", silog_lambda={self.variance_focus}"
