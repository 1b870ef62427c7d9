r"""Learnable fake-quant modules: MQBench's QAT algorithms on qtool's schemes.

Every module keeps its :class:`qtool.scheme.QuantScheme` (bits, signed, symmetric, per-channel
axis, narrow range, power of two) and in eval mode computes exactly what a
QuantizeLinear -> DequantizeLinear pair computes with its current scale ``s`` and zero point
``z`` (round half to even, as onnxruntime)::

    fq(x) = (clamp(round(x / s) + z, qmin, qmax) - z) * s

so the exported QDQ graph reproduces the module. In training each algorithm has its own
straight-through estimator (STE). Notation: ``round_ste(v)`` is ``round(v)`` forward and the
identity backward; ``gs(p, g)`` is ``p`` forward with its gradient multiplied by ``g``.

* **LSQ** (Esser et al. 2020), learnable step ``s`` (zero point fixed)::

      s' = gs(s, g),  g = 1 / sqrt(N * qmax)      (N: elements per scale: the tensor, or
                                                   one output channel for per-channel)
      y  = (clamp(round_ste(x / s') + z, qmin, qmax) - z) * s'

  which gives LSQ's gradients: ``dy/ds = round(x/s) - x/s`` inside the range and
  ``qmin - z`` / ``qmax - z`` at the clip, ``dy/dx = 1`` inside and 0 outside.
* **LSQ+** (Bhalgat et al. 2020): LSQ with a learnable offset for asymmetric schemes, the
  zero point a float parameter used as ``clamp(round_ste(gs(z, g)), qmin, qmax)``
  (symmetric schemes keep ``z = 0``, so LSQ+ is LSQ there).
* **PACT** (Choi et al. 2018), activations: a learnable clip ``alpha`` (``[0, alpha]``
  unsigned, ``[-alpha, alpha]`` signed symmetric, ``[alpha_lo, alpha]`` asymmetric as MQBench
  extends it) and the grid ``s = alpha / qmax`` (``(alpha - alpha_lo) / (qmax - qmin)``)::

      y = clip(x, lo, hi),   out = fq(y) forward, y backward

  The clip bounds are the grid's end points in value and ``alpha`` in gradient, so
  ``d out / d alpha = 1`` where ``x >= alpha`` and 0 inside (PACT has no gradient inside the
  clip), ``d out / dx = 1`` inside. Initialised from calibration (PACT's handcrafted 6 is a
  poor start for a calibrated graph). Weights use DoReFa's quantizer.
* **DoReFa** (Zhou et al. 2016), weights normalised by tanh, then quantized on a fixed grid::

      w_t = tanh(w) / max|tanh(w)| * c,   out = (clamp(round_ste(w_t / s) + z, qmin, qmax) - z) * s

  with ``c = max|w|`` at import (per channel where the scheme is), so the normalised weight
  keeps the layer's magnitude (the BN-folded graph has no BN to absorb DoReFa's [-1, 1]), and
  ``(s, z)`` the scheme's parameters of ``[-c, c]``. Activations: a fixed clip at the
  calibrated range with the same STE (DoReFa's handcrafted [0, 1], moved to the data's
  range as MQBench moves it for hardware).
* **DSQ** (Gong et al. 2019), a soft staircase with temperature ``alpha`` (default 0.4)::

      t = clamp(x / s + z, qmin, qmax),   k = log((S + 1) / (S - 1)),   S = 1 / (1 - alpha)
      soft = floor(t) + 0.5 + 0.5 * S * tanh(k * (t - floor(t) - 0.5))
      out  = (round_ste(soft) - z) * s

  forward equals hard rounding, backward is the derivative of the tanh staircase. The range
  is rule-based: weights use the current min-max, activations the batch-averaged min-max
  with an exponential moving average (momentum 0.9), turned into ``(s, z)`` by the scheme.

**Power of two** (TVM): the effective scale is ``2 ** round_ste(log2 s)``, so scales stay
powers of two through training and export; the gradient reaches ``s`` as ``2**k / s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from qtool.errors import PlanError
from qtool.scheme import MIN_SCALE, QuantScheme

# ----------------------------------------------------------------------------- STE helpers


def straight_through(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` exactly forward, the gradient of ``surrogate`` backward.

    Written ``value.detach() + (surrogate - surrogate.detach())`` so the forward value is
    bit-exact (``x + (f(x) - x).detach()`` can be off by one ulp, and the exported graph
    must compute the same float32 numbers).
    """
    return value.detach() + (surrogate - surrogate.detach())


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` (half to even) forward, identity backward."""
    return straight_through(torch.round(x), x)


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` forward, gradient multiplied by ``factor`` backward."""
    return straight_through(x, x * factor)


def power_of_two_ste(scale: torch.Tensor) -> torch.Tensor:
    """``2 ** round(log2(scale))`` forward, gradient through ``round_ste``."""
    return torch.pow(2.0, round_ste(torch.log2(scale)))


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """QuantizeLinear then DequantizeLinear: ``(clamp(round(x/s) + z) - z) * s``."""
    return (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


# ------------------------------------------------------------------------------ the base


class FakeQuantize(nn.Module):
    """Fake quantization of one tensor (or one shared group) under a fixed scheme.

    Subclasses define :meth:`effective` (the scale and zero point in use, differentiable as
    the algorithm wants) and may override :meth:`train_forward`. In eval mode every subclass
    computes :func:`fake_quantize` with the effective parameters, which is what the exported
    QDQ pair computes.

    Args:
        scheme: The backend's scheme for this tensor.
        scale: Initial scale (0-d per tensor, 1-d per channel), e.g. from calibration.
        zero_point: Initial zero point, same shape.
        init: The float tensor itself, for quantizers that derive their range from it
            (weights); None for activations.

    Attributes:
        enabled: When False the module passes values through (float evaluation).
    """

    algorithm = "fixed"

    def __init__(self, scheme: QuantScheme, scale, zero_point, *, init: torch.Tensor | None = None):
        super().__init__()
        scale = np.asarray(scale, dtype=np.float32)
        zero_point = np.asarray(zero_point, dtype=np.int64)
        if scale.shape != zero_point.shape or scale.ndim > 1:
            raise PlanError(
                f"fake-quant: scale {scale.shape} and zero point {zero_point.shape} must be one "
                "value or one vector of the same length"
            )
        self.scheme = scheme
        self.quant_min, self.quant_max = scheme.qmin, scheme.qmax
        self.axis = scheme.per_channel_axis if scale.ndim else None
        self.enabled = True

    # -- what subclasses provide ------------------------------------------------------

    def effective(self, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale and zero point in use: 0-d or 1-d float tensors."""
        raise NotImplementedError

    def train_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training-mode forward; by default the STE of LSQ (see the module docstring)."""
        scale, zero_point = self.effective(x)
        scale, zero_point = self._view(scale, x), self._view(zero_point, x)
        levels = torch.clamp(round_ste(x / scale) + zero_point, self.quant_min, self.quant_max)
        return (levels - zero_point) * scale

    # -- shared behaviour -------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The algorithm's estimator in training, :func:`fake_quantize` in eval."""
        if not self.enabled:
            return x
        if self.training:
            return self.train_forward(x)
        scale, zero_point = self.effective(x)
        return fake_quantize(
            x, self._view(scale, x), self._view(zero_point, x), self.quant_min, self.quant_max
        )

    def qparams(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scale float32, zero_point int64)`` as the exported QDQ pair stores them."""
        with torch.no_grad():
            scale, zero_point = self.effective()
        scale = scale.detach().cpu().numpy().astype(np.float32)
        zero_point = np.round(zero_point.detach().cpu().numpy()).astype(np.int64)
        return scale, zero_point

    def extra_repr(self) -> str:
        """The scheme in the plan's short form (e.g. ``s4 sym pot``)."""
        s = self.scheme
        kind = f"{'s' if s.signed else 'u'}{s.bits} {'sym' if s.symmetric else 'asym'}"
        kind += " narrow" if s.narrow_range else ""
        kind += " pot" if s.power_of_two else ""
        kind += f" axis={self.axis}" if self.axis is not None else ""
        return kind

    def _view(self, value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.axis is None or value.ndim == 0:
            return value
        shape = [1] * x.ndim
        shape[self.axis] = -1
        return value.reshape(shape)

    def _elements_per_scale(self, x: torch.Tensor | None) -> int:
        if x is None:
            return 1
        channels = x.shape[self.axis] if self.axis is not None else 1
        return max(1, x.numel() // channels)

    def _power_of_two(self, scale: torch.Tensor) -> torch.Tensor:
        scale = torch.clamp(scale.abs(), min=MIN_SCALE)
        return power_of_two_ste(scale) if self.scheme.power_of_two else scale

    def _zero_points(self, zero_point: np.ndarray) -> torch.Tensor:
        return _owned(zero_point)


def _owned(values) -> torch.Tensor:
    """A float32 tensor with its own memory.

    ``torch.as_tensor`` of a float32 array shares the array's memory, and the scales come
    from the PTQ model's qparams: training would change the PTQ model in place (its
    per-channel scale arrays), and the "PTQ model" written when no epoch beats it would not
    be the PTQ model.
    """
    return torch.tensor(np.array(values, dtype=np.float32, copy=True))


def _grid_of(scheme: QuantScheme, scale: np.ndarray, zero_point: np.ndarray):
    """``(lo, hi)`` float64 end points of the integer grid of ``(scale, zero_point)``."""
    scale = np.asarray(scale, dtype=np.float64)
    zero_point = np.asarray(zero_point, dtype=np.float64)
    return (scheme.qmin - zero_point) * scale, (scheme.qmax - zero_point) * scale


# ------------------------------------------------------------------------------ algorithms


class FixedFakeQuantize(FakeQuantize):
    """A fixed (rule-based) scale and zero point with the clipped STE (DoReFa activations)."""

    algorithm = "dorefa"

    def __init__(self, scheme, scale, zero_point, *, init=None):
        super().__init__(scheme, scale, zero_point, init=init)
        self.register_buffer("scale", _owned(scale))
        self.register_buffer("zero_point", self._zero_points(zero_point))

    def effective(self, x=None):
        """See :meth:`FakeQuantize.effective`."""
        return self._power_of_two(self.scale), self.zero_point


class LSQFakeQuantize(FakeQuantize):
    """LSQ: learnable step size with gradient scale ``1 / sqrt(N * qmax)``."""

    algorithm = "lsq"
    learn_zero_point = False

    def __init__(self, scheme, scale, zero_point, *, init=None):
        super().__init__(scheme, scale, zero_point, init=init)
        self.scale = nn.Parameter(_owned(scale))
        zero_point = self._zero_points(zero_point)
        if self.learn_zero_point and not scheme.symmetric:
            self.zero_point = nn.Parameter(zero_point)
        else:
            self.register_buffer("zero_point", zero_point)

    def effective(self, x=None):
        """See :meth:`FakeQuantize.effective`."""
        factor = 1.0 / math.sqrt(self._elements_per_scale(x) * self.quant_max)
        scale = self._power_of_two(grad_scale(self.scale, factor))
        zero_point = self.zero_point
        if isinstance(zero_point, nn.Parameter):
            zero_point = torch.clamp(
                round_ste(grad_scale(zero_point, factor)), self.quant_min, self.quant_max
            )
        return scale, zero_point


class LSQPlusFakeQuantize(LSQFakeQuantize):
    """LSQ+: LSQ with a learnable zero point (offset) for asymmetric schemes."""

    algorithm = "lsq+"
    learn_zero_point = True


class PACTFakeQuantize(FakeQuantize):
    """PACT: a learnable clipping threshold for activations (see the module docstring)."""

    algorithm = "pact"

    def __init__(self, scheme, scale, zero_point, *, init=None):
        super().__init__(scheme, scale, zero_point, init=init)
        if self.axis is not None:
            raise PlanError("PACT clips activations, which are per tensor; not a per-channel one")
        lo, hi = _grid_of(scheme, scale, zero_point)
        self.alpha = nn.Parameter(torch.tensor(float(hi), dtype=torch.float32))
        if not scheme.symmetric:
            self.alpha_low = nn.Parameter(torch.tensor(float(lo), dtype=torch.float32))

    def _lower(self) -> torch.Tensor:
        if not self.scheme.symmetric:
            return self.alpha_low
        if self.scheme.signed:
            return -self.alpha
        return torch.zeros((), dtype=self.alpha.dtype, device=self.alpha.device)

    def effective(self, x=None):
        """See :meth:`FakeQuantize.effective`."""
        qmin, qmax = self.quant_min, self.quant_max
        hi, lo = self.alpha.detach(), self._lower().detach()
        if self.scheme.symmetric:
            scale = self._power_of_two(hi.abs() / qmax)
            zero_point = torch.zeros_like(scale)
        else:
            hi = torch.maximum(hi, torch.zeros_like(hi))
            lo = torch.minimum(lo, torch.zeros_like(lo))
            scale = self._power_of_two((hi - lo) / (qmax - qmin))
            zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
        return scale, zero_point

    def train_forward(self, x):
        """See :meth:`FakeQuantize.train_forward`."""
        scale, zero_point = self.effective(x)
        grid_lo = (self.quant_min - zero_point) * scale
        grid_hi = (self.quant_max - zero_point) * scale
        upper = straight_through(grid_hi, self.alpha)
        lower = straight_through(grid_lo, self._lower())
        clipped = torch.minimum(torch.maximum(x, lower), upper)
        quantized = fake_quantize(clipped, scale, zero_point, self.quant_min, self.quant_max)
        return straight_through(quantized, clipped)


class DoReFaWeightFakeQuantize(FakeQuantize):
    """DoReFa weights: ``tanh`` normalisation to the import-time magnitude, fixed grid."""

    algorithm = "dorefa"

    def __init__(self, scheme, scale, zero_point, *, init=None):
        super().__init__(scheme, scale, zero_point, init=init)
        if init is None:
            raise PlanError("the DoReFa weight quantizer needs the weight to set its range")
        magnitude = self._reduce_abs_max(init.detach().float()).clamp(min=MIN_SCALE)
        self.register_buffer("magnitude", magnitude)
        amax = magnitude.cpu().numpy().astype(np.float64)
        if self.axis is None:
            amax = amax.reshape(())
        fixed_scale, fixed_zero_point = scheme.qparams(-amax, amax)
        self.register_buffer("scale", _owned(fixed_scale))
        self.register_buffer("zero_point", self._zero_points(fixed_zero_point))

    def _reduce_abs_max(self, w: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return w.abs().max()
        dims = [d for d in range(w.ndim) if d != self.axis]
        return w.abs().amax(dim=dims)

    def transform(self, w: torch.Tensor) -> torch.Tensor:
        """``tanh(w) / max|tanh(w)| * c``: the float weight the layer actually uses."""
        t = torch.tanh(w)
        peak = self._view(self._reduce_abs_max(t).clamp(min=MIN_SCALE), w)
        return t / peak * self._view(self.magnitude, w)

    def effective(self, x=None):
        """See :meth:`FakeQuantize.effective`."""
        return self.scale, self.zero_point

    def forward(self, x):
        """``fq(transform(w))``: the estimator in training, exact rounding in eval."""
        if not self.enabled:
            return x
        w = self.transform(x)
        if self.training:
            return self.train_forward(w)
        scale, zero_point = self.effective()
        return fake_quantize(
            w, self._view(scale, w), self._view(zero_point, w), self.quant_min, self.quant_max
        )


class DSQFakeQuantize(FakeQuantize):
    """DSQ: tanh soft staircase in the backward, rule-based range (see the module docstring).

    Args:
        alpha: DSQ's temperature in (0, 1); smaller is closer to the hard staircase.
        momentum: EMA momentum of the activation range.
    """

    algorithm = "dsq"

    def __init__(self, scheme, scale, zero_point, *, init=None, alpha: float = 0.4,
                 momentum: float = 0.9):
        super().__init__(scheme, scale, zero_point, init=init)
        if not 0.0 < alpha < 1.0:
            raise PlanError(f"DSQ temperature alpha={alpha} must be in (0, 1)")
        self.alpha, self.momentum = alpha, momentum
        self.is_weight = init is not None
        self.register_buffer("scale", _owned(scale))
        self.register_buffer("zero_point", self._zero_points(zero_point))
        lo, hi = _grid_of(scheme, scale, zero_point)
        self.register_buffer("range_low", _owned(lo))
        self.register_buffer("range_high", _owned(hi))

    def effective(self, x=None):
        """See :meth:`FakeQuantize.effective`."""
        return self.scale, self.zero_point

    @torch.no_grad()
    def _update_range(self, x: torch.Tensor) -> None:
        if self.is_weight:
            if self.axis is None:
                lo, hi = x.min(), x.max()
            else:
                dims = [d for d in range(x.ndim) if d != self.axis]
                lo, hi = x.amin(dim=dims), x.amax(dim=dims)
            self.range_low.copy_(lo)
            self.range_high.copy_(hi)
        else:
            flat = x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)
            lo, hi = flat.min(dim=1).values.mean(), flat.max(dim=1).values.mean()
            m = self.momentum
            self.range_low.mul_(m).add_((1 - m) * lo)
            self.range_high.mul_(m).add_((1 - m) * hi)
        scale, zero_point = self.scheme.qparams(
            self.range_low.cpu().numpy().astype(np.float64),
            self.range_high.cpu().numpy().astype(np.float64),
        )
        self.scale.copy_(torch.as_tensor(scale))
        self.zero_point.copy_(torch.as_tensor(zero_point, dtype=torch.float32))

    def train_forward(self, x):
        """See :meth:`FakeQuantize.train_forward`."""
        self._update_range(x)
        # clones: a shared module updates its buffers in place again before backward
        scale = self._view(self.scale.clone(), x)
        zero_point = self._view(self.zero_point.clone(), x)
        steep = 1.0 / (1.0 - self.alpha)
        k = math.log((steep + 1.0) / (steep - 1.0))
        t = torch.clamp(x / scale + zero_point, self.quant_min, self.quant_max)
        floor = torch.floor(t).detach()
        soft = floor + 0.5 + 0.5 * steep * torch.tanh(k * (t - floor - 0.5))
        return (round_ste(soft) - zero_point) * scale


# -------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Algorithm:
    """One QAT algorithm: the quantizer classes for weights and for activations."""

    name: str
    weight: type[FakeQuantize]
    activation: type[FakeQuantize]
    summary: str


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("lsq", LSQFakeQuantize, LSQFakeQuantize, "learned step size, both"),
        Algorithm("lsq+", LSQPlusFakeQuantize, LSQPlusFakeQuantize,
                  "learned step size and offset (asymmetric)"),
        Algorithm("pact", DoReFaWeightFakeQuantize, PACTFakeQuantize,
                  "learned activation clip, DoReFa weights"),
        Algorithm("dorefa", DoReFaWeightFakeQuantize, FixedFakeQuantize,
                  "tanh-normalised weights, fixed activation clip"),
        Algorithm("dsq", DSQFakeQuantize, DSQFakeQuantize,
                  "tanh soft staircase, rule-based ranges"),
    )
}


def algorithm_names() -> list[str]:
    """The algorithm names ``to_torch`` and ``qtool qat --algorithm`` accept."""
    return list(ALGORITHMS)


def get_algorithm(name: str) -> Algorithm:
    """The :class:`Algorithm` called ``name``.

    Raises:
        PlanError: Unknown name.
    """
    try:
        return ALGORITHMS[name.lower()]
    except KeyError:
        raise PlanError(
            f"unknown QAT algorithm {name!r}", f"choose one of {', '.join(ALGORITHMS)}"
        ) from None


__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "DSQFakeQuantize",
    "DoReFaWeightFakeQuantize",
    "FakeQuantize",
    "FixedFakeQuantize",
    "LSQFakeQuantize",
    "LSQPlusFakeQuantize",
    "PACTFakeQuantize",
    "algorithm_names",
    "fake_quantize",
    "get_algorithm",
    "grad_scale",
    "power_of_two_ste",
    "round_ste",
    "straight_through",
]
