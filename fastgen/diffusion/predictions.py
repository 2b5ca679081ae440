"""Conversions between the quantities a diffusion network may predict.

Every schedule in fastgen writes the noisy sample as

    x_t = alpha_t * x0 + sigma_t * eps

(VP/DDPM: ``alpha_t^2 + sigma_t^2 = 1``; rectified flow: ``alpha_t = 1 - sigma_t``). A network output
``out`` is one of

* ``"epsilon"``:      out = eps
* ``"v_prediction"``: out = v = alpha_t * eps - sigma_t * x0        (needs alpha^2 + sigma^2 = 1)
* ``"sample"``:       out = x0
* ``"flow"``:         out = u = eps - x0                            (needs alpha = 1 - sigma)

The functions below are pure tensor maps. ``alpha``/``sigma`` may be python floats, 0-d tensors, per-sample
tensors of shape ``[B]`` (broadcast against ``x`` of shape ``[B, ...]``) or tensors already broadcastable to ``x``.
No special cases are made: epsilon -> x0 divides by ``alpha`` and sample -> eps divides by ``sigma``, exactly
as the equations require.
"""

from __future__ import annotations

import torch

from fastgen.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")

Coef = float | torch.Tensor


def append_dims(v: torch.Tensor, target_ndim: int) -> torch.Tensor:
    """Append trailing singleton dims to ``v`` until it has ``target_ndim`` dims: [B] -> [B, 1, 1, 1]."""
    missing = target_ndim - v.ndim
    if missing < 0:
        raise ValueError(f"append_dims: tensor has {v.ndim} dims, more than the target {target_ndim}.")
    return v[(...,) + (None,) * missing]


def expand_like(coef: Coef, x: torch.Tensor) -> Coef:
    """Make a coefficient broadcast against ``x`` of shape ``[B, ...]``.

    Python numbers and 0-d tensors are returned as they are (a 0-d tensor is moved to ``x``'s device);
    a tensor with ``1 <= ndim < x.ndim`` is treated as per-sample (leading dims match ``x``) and gets trailing
    singleton dims appended. The dtype is left alone, so torch's usual type promotion applies.
    """
    if not isinstance(coef, torch.Tensor):
        return coef
    coef = coef.to(x.device)
    if coef.ndim == 0 or coef.ndim >= x.ndim:
        return coef
    return append_dims(coef, x.ndim)


def _check_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(
            f"Unsupported prediction_type {prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}."
        )


def to_x0_eps(
    out: torch.Tensor, x_t: torch.Tensor, alpha: Coef, sigma: Coef, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a network output into ``(x0, eps)`` given ``x_t = alpha*x0 + sigma*eps``.

    * epsilon:      eps = out,                x0 = (x_t - sigma*eps) / alpha
    * v_prediction: x0 = alpha*x_t - sigma*v, eps = sigma*x_t + alpha*v       (alpha^2 + sigma^2 = 1)
    * sample:       x0 = out,                 eps = (x_t - alpha*x0) / sigma
    * flow:         x0 = x_t - sigma*u,       eps = x_t + alpha*u              (alpha = 1 - sigma)
    """
    _check_type(prediction_type)
    a = expand_like(alpha, x_t)
    s = expand_like(sigma, x_t)
    if prediction_type == "epsilon":
        return (x_t - s * out) / a, out
    if prediction_type == "v_prediction":
        return a * x_t - s * out, s * x_t + a * out
    if prediction_type == "sample":
        return out, (x_t - a * out) / s
    return x_t - s * out, x_t + a * out  # flow


def to_x0(out: torch.Tensor, x_t: torch.Tensor, alpha: Coef, sigma: Coef, prediction_type: str) -> torch.Tensor:
    """The ``x0`` part of :func:`to_x0_eps`, computing only what is needed."""
    _check_type(prediction_type)
    a = expand_like(alpha, x_t)
    s = expand_like(sigma, x_t)
    if prediction_type == "epsilon":
        return (x_t - s * out) / a
    if prediction_type == "v_prediction":
        return a * x_t - s * out
    if prediction_type == "sample":
        return out
    return x_t - s * out


def to_eps(out: torch.Tensor, x_t: torch.Tensor, alpha: Coef, sigma: Coef, prediction_type: str) -> torch.Tensor:
    """The ``eps`` part of :func:`to_x0_eps`, computing only what is needed."""
    _check_type(prediction_type)
    a = expand_like(alpha, x_t)
    s = expand_like(sigma, x_t)
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return s * x_t + a * out
    if prediction_type == "sample":
        return (x_t - a * out) / s
    return x_t + a * out


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha: Coef, sigma: Coef, prediction_type: str) -> torch.Tensor:
    """Inverse of :func:`to_x0_eps`: the network output that encodes ``(x0, eps)``.

    epsilon -> eps; v_prediction -> alpha*eps - sigma*x0; sample -> x0; flow -> eps - x0.
    """
    _check_type(prediction_type)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "flow":
        return eps - x0
    a = expand_like(alpha, x0)
    s = expand_like(sigma, x0)
    return a * eps - s * x0


def convert(
    out: torch.Tensor, x_t: torch.Tensor, alpha: Coef, sigma: Coef, from_type: str, to_type: str
) -> torch.Tensor:
    """Re-express a network output of ``from_type`` as ``to_type`` at the same ``(x_t, alpha, sigma)``."""
    _check_type(from_type)
    _check_type(to_type)
    if from_type == to_type:
        return out
    x0, eps = to_x0_eps(out, x_t, alpha, sigma, from_type)
    return from_x0_eps(x0, eps, alpha, sigma, to_type)
