r"""Weighted layers with weight fake-quant, BatchNorm kept for QAT, and BN re-calibration.

A Conv followed by BatchNormalization (scale ``gamma``, shift ``beta``, running mean ``mu``
and variance ``var``, ``eps``) deploys folded (MQBench Eq. 4)::

    s = gamma / sqrt(var + eps),   w_fold = w * s,   b_fold = (b - mu) * s + beta

and the backend quantizes ``w_fold``. :class:`QuantConv` keeps ``w``, ``b`` and the BN and
trains with one of MQBench's folding strategies (Fig. 3); ``q()`` is the weight fake-quant,
``mu_B, var_B`` the batch statistics of the float ``conv(x, w)``:

* **0**: fold once at import and train ``w_fold, b_fold`` with no BN (a plain layer).
* **1**: fold with the running statistics, which stay frozen; ``gamma, beta`` still train:
  ``y = conv(x, q(w * s)) + b_fold``.
* **2** (as Jacob et al. 2018): fold with the batch statistics (a float convolution first):
  ``y = conv(x, q(w * gamma / sqrt(var_B + eps))) + beta - mu_B * gamma / sqrt(var_B + eps)``;
  running statistics updated.
* **3** (as Krishnamoorthi 2018): fold with the running statistics, then correct to the batch:
  ``y = conv(x, q(w * s)) * sqrt(var + eps) / sqrt(var_B + eps) + beta - mu_B * s_B`` with
  ``s_B = gamma / sqrt(var_B + eps)``.
* **4** (PyTorch's ConvBn QAT): ``y = BN(conv(x, q(w * s)) / s + b)`` with BN in training
  mode, so the batch statistics are those of the quantized-weight convolution.

In eval mode every strategy computes the folded layer ``conv(x, q(w_fold)) + b_fold`` with
the running statistics: what the exported graph computes. A layer whose backend wants an
int32 bias rounds its bias to the grid ``s_in * s_w`` (straight-through), as the exported
DequantizeLinear of the bias does.

:func:`recalibrate_bn` (MQBench appendix C.3): with every quantizer frozen, forward
calibration data and reset each kept BN's running mean and variance to the average of the
batch statistics of its quantized-weight convolution, normalising with the batch statistics
on the way (so later layers see the recalibrated activations). Because folding uses the new
variance, the pass is repeated (``rounds``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qtool.errors import PlanError
from qtool.qat.fake_quant import FakeQuantize, straight_through

#: MQBench's folding strategies (0-4) and what each does.
BN_STRATEGIES = {
    0: "fold BN at import, train the folded weights without BN",
    1: "fold with frozen running statistics, train gamma and beta",
    2: "fold with batch statistics (float conv first), update running statistics",
    3: "fold with running statistics, correct the output to batch statistics",
    4: "BN after the quantized conv (batch statistics of the quantized-weight conv)",
}

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class QuantWeight(nn.Module):
    """A float weight (trainable) and its fake-quant; calling it gives the quantized weight.

    Args:
        name: The initializer's name in the ONNX graph.
        values: Its float values (ONNX layout).
        quantizer: The fake-quant of the weight (of the folded weight when BN is kept);
            None for a layer the plan keeps float.
    """

    def __init__(self, name: str, values: np.ndarray, quantizer: FakeQuantize | None):
        super().__init__()
        self.name = name
        self.weight = nn.Parameter(torch.as_tensor(np.array(values, dtype=np.float32)))
        self.quantizer = quantizer

    def forward(self) -> torch.Tensor:
        """The weight as the layer uses it (fake-quantized, or float for a float layer)."""
        return self.weight if self.quantizer is None else self.quantizer(self.weight)


class _BiasRounding:
    """The int32 bias grid ``s_in * s_w`` of a layer (not a module: it owns no parameters)."""

    def __init__(self, input_quantizer: FakeQuantize, weight_quantizer: FakeQuantize):
        self.sources = (input_quantizer, weight_quantizer)

    def __call__(self, bias: torch.Tensor) -> torch.Tensor:
        input_q, weight_q = self.sources
        if not (input_q.enabled and weight_q.enabled):
            return bias
        with torch.no_grad():
            s_in, _ = input_q.effective()
            s_w, _ = weight_q.effective()
            step = (s_in * s_w).reshape(-1) if s_w.ndim else (s_in * s_w).reshape(())
        return straight_through(torch.round(bias / step) * step, bias)


class QuantConv(nn.Module):
    """Conv (1-3 spatial dims) with weight fake-quant and optionally a BN kept for training.

    Args:
        weight: The :class:`QuantWeight` (the raw conv weight when ``bn`` is given).
        bias: Float bias or None.
        attrs: The ONNX Conv attributes (strides, pads, dilations, group, auto_pad).
        bn: The BatchNorm that follows (strategies 1-4), or None.
        strategy: MQBench folding strategy 0-4 (0 means ``bn`` is None).
        bias_rounding: Rounds the bias to the int32 grid (backends with int32 bias), or None.
        name: The ONNX node name.
    """

    def __init__(
        self,
        weight: QuantWeight,
        bias: torch.Tensor | None,
        attrs: dict,
        *,
        bn: nn.modules.batchnorm._BatchNorm | None = None,
        strategy: int = 0,
        bias_rounding: _BiasRounding | None = None,
        name: str = "",
    ):
        super().__init__()
        if strategy not in BN_STRATEGIES:
            raise PlanError(f"BN folding strategy {strategy} is not one of 0-4")
        if (bn is None) != (strategy == 0):
            raise PlanError(f"{name}: strategy {strategy} needs a BN exactly when it is not 0")
        self.name = name
        self.weight = weight
        spatial = weight.weight.ndim - 2
        if spatial not in _CONV:
            raise PlanError(f"Conv {name}: {spatial} spatial dims are not supported by QAT")
        self.conv = _CONV[spatial]
        self.bias = nn.Parameter(bias.clone()) if bias is not None else None
        self.bn = bn
        self.strategy = strategy
        self.bias_rounding = bias_rounding
        self.stride = tuple(attrs.get("strides", [1] * spatial))
        self.dilation = tuple(attrs.get("dilations", [1] * spatial))
        self.groups = int(attrs.get("group", 1))
        auto_pad = attrs.get("auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad not in ("NOTSET", "VALID"):
            raise PlanError(f"Conv {name}: auto_pad={auto_pad} is not supported by QAT",
                            "run the cleanup pass or re-export with explicit pads")
        pads = [0] * 2 * spatial
        if auto_pad == "NOTSET":
            pads = list(attrs.get("pads", pads))
        begin, end = pads[:spatial], pads[spatial:]
        if begin == end:
            self.padding, self.input_pad = tuple(begin), None
        else:
            self.padding = (0,) * spatial
            self.input_pad = [p for b, e in zip(reversed(begin), reversed(end), strict=True)
                              for p in (b, e)]
        self._calibrating = False
        self._sums: list[torch.Tensor] = []

    # ------------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer by its strategy in training; the folded layer in eval."""
        if self.input_pad is not None:
            x = F.pad(x, self.input_pad)
        if self.bn is None:
            return self._conv(x, self.weight(), self._round_bias(self.bias))
        if self._calibrating:
            return self._calibration_forward(x)
        if not self.training or self.strategy == 1:
            weight, bias = self.folded()
            return self._conv(x, self.weight.quantizer(weight), self._round_bias(bias))
        if self.strategy == 4:
            s = self._running_factor()
            y = self._conv(x, self.weight.quantizer(self.weight.weight * self._w_view(s)), None)
            y = y / self._y_view(s, y)
            if self.bias is not None:
                y = y + self._y_view(self.bias, y)
            return self.bn(y)
        # strategies 2 and 3: batch statistics of the float convolution first
        float_out = self._conv(x, self.weight.weight, None)
        mean, var = _channel_stats(float_out)
        self._update_running(mean, var, float_out)
        batch_factor = self.bn.weight / torch.sqrt(var + self.bn.eps)
        shift = self.bn.bias - mean * batch_factor
        if self.strategy == 2:
            weight = self.weight.weight * self._w_view(batch_factor)
            return self._conv(x, self.weight.quantizer(weight), self._round_bias(shift))
        running_std = torch.sqrt(self.bn.running_var + self.bn.eps)
        weight = self.weight.weight * self._w_view(self.bn.weight / running_std)
        y = self._conv(x, self.weight.quantizer(weight), None)
        correction = running_std / torch.sqrt(var + self.bn.eps)
        return y * self._y_view(correction, y) + self._y_view(self._round_bias(shift), y)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(w_fold, b_fold)`` with the running statistics (the deployed layer, pre-rounding)."""
        if self.bn is None:
            return self.weight.weight, self.bias
        s = self._running_factor()
        bias = self.bias if self.bias is not None else torch.zeros_like(s)
        return (self.weight.weight * self._w_view(s),
                (bias - self.bn.running_mean) * s + self.bn.bias)

    def deployed(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias the eval forward uses: folded, DoReFa applied, on the grid.

        Exported on the grid, the integers the export computes from them are exactly the
        levels torch used (re-rounding an on-grid value cannot move it).
        """
        weight, bias = self.folded()
        quantizer = self.weight.quantizer
        return (quantizer(weight) if quantizer is not None else weight), self._round_bias(bias)

    # ---------------------------------------------------------------- BN calibration

    def start_bn_calibration(self) -> None:
        """Collect batch statistics instead of using the running ones (see the module doc)."""
        if self.bn is None:
            return
        self._calibrating = True
        self._sums = []

    def finish_bn_calibration(self) -> int:
        """Set the running statistics to the batch averages; returns the batches seen."""
        self._calibrating = False
        if self.bn is None or not self._sums:
            return 0
        weight = sum(n for n, _, _ in self._sums)
        mean = sum(n * m for n, m, _ in self._sums) / weight
        var = sum(n * v for n, _, v in self._sums) / weight
        with torch.no_grad():
            self.bn.running_mean.copy_(mean)
            self.bn.running_var.copy_(var)
        seen, self._sums = len(self._sums), []
        return seen

    def _calibration_forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self._running_factor()
        y = self._conv(x, self.weight.quantizer(self.weight.weight * self._w_view(s)), None)
        y = y / self._y_view(s, y)
        if self.bias is not None:
            y = y + self._y_view(self.bias, y)
        mean, var = _channel_stats(y)
        count = y.numel() // y.shape[1]
        unbiased = var * count / max(count - 1, 1)
        self._sums.append((count, mean.detach(), unbiased.detach()))
        normalised = (y - self._y_view(mean, y)) / self._y_view(torch.sqrt(var + self.bn.eps), y)
        return normalised * self._y_view(self.bn.weight, y) + self._y_view(self.bn.bias, y)

    # -------------------------------------------------------------------- helpers

    def _running_factor(self) -> torch.Tensor:
        return self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor) -> None:
        momentum = self.bn.momentum if self.bn.momentum is not None else 0.1
        count = y.numel() // y.shape[1]
        conv_bias = self.bias if self.bias is not None else torch.zeros_like(mean)
        self.bn.running_mean.mul_(1 - momentum).add_(momentum * (mean + conv_bias))
        self.bn.running_var.mul_(1 - momentum).add_(momentum * var * count / max(count - 1, 1))
        self.bn.num_batches_tracked.add_(1)

    def _round_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        if bias is None or self.bias_rounding is None:
            return bias
        return self.bias_rounding(bias)

    def _conv(self, x, weight, bias):
        return self.conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _w_view(self, values: torch.Tensor) -> torch.Tensor:
        return values.reshape((-1,) + (1,) * (self.weight.weight.ndim - 1))

    @staticmethod
    def _y_view(values: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return values.reshape((1, -1) + (1,) * (y.ndim - 2))


def _channel_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (axis 1) mean and biased variance over every other axis."""
    dims = [d for d in range(y.ndim) if d != 1]
    mean = y.mean(dim=dims)
    var = ((y - mean.reshape((1, -1) + (1,) * (y.ndim - 2))) ** 2).mean(dim=dims)
    return mean, var


class QuantLinear(nn.Module):
    """ONNX Gemm with a quantized weight: ``alpha * (x @ op(W)) + beta * C``.

    The weight stays in the ONNX layout (``(N, K)`` with ``transB``, else ``(K, N)``) so the
    per-channel axis and the export need no transposition.

    Args:
        weight: The :class:`QuantWeight`.
        bias: Float ``C`` or None.
        attrs: The Gemm attributes (alpha, beta, transA, transB).
        bias_rounding: Int32 bias grid, or None.
        name: The ONNX node name.
    """

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None, attrs: dict, *,
                 bias_rounding: _BiasRounding | None = None, name: str = ""):
        super().__init__()
        if int(attrs.get("transA", 0)):
            raise PlanError(f"Gemm {name}: transA=1 is not supported by QAT")
        self.name = name
        self.weight = weight
        self.bias = nn.Parameter(bias.clone()) if bias is not None else None
        self.alpha = float(attrs.get("alpha", 1.0))
        self.beta = float(attrs.get("beta", 1.0))
        self.trans_b = bool(int(attrs.get("transB", 0)))
        self.bias_rounding = bias_rounding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``alpha * (x @ op(W_q)) + beta * C`` (C rounded to the int32 grid if planned)."""
        weight = self.weight()
        y = x @ (weight.t() if self.trans_b else weight)
        if self.alpha != 1.0:
            y = y * self.alpha
        if self.bias is not None:
            bias = self.bias if self.bias_rounding is None else self.bias_rounding(self.bias)
            y = y + (bias * self.beta if self.beta != 1.0 else bias)
        return y

    def deployed(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias the eval forward uses (on the grid, see QuantConv.deployed)."""
        bias = self.bias
        if bias is not None and self.bias_rounding is not None:
            bias = self.bias_rounding(bias)
        return self.weight(), bias


def recalibrate_bn(
    model: nn.Module, batches: Iterable, *, rounds: int = 2, num_batches: int | None = None
) -> int:
    """Re-estimate every kept BN's running statistics on data, quantizers frozen.

    Args:
        model: A :class:`qtool.qat.QatModel` imported with BN kept (strategies 1-4).
        batches: Inputs as the model takes them (tensors, arrays, tuples or dicts by input
            name); iterated once per round, so a list or a DataLoader, not a generator.
        rounds: Passes over the data (folding uses the new variance, so a second pass
            refines the first).
        num_batches: Use at most this many batches per round.

    Returns:
        The number of BN layers recalibrated.

    Raises:
        PlanError: The model has no kept BN (imported with strategy 0 or without the
            BN graph).
    """
    layers = [m for m in model.modules() if isinstance(m, QuantConv) and m.bn is not None]
    if not layers:
        raise PlanError(
            "the model keeps no BatchNorm to recalibrate",
            "import with to_torch(..., bn_graph=<the float model>, bn_strategy=1..4)",
        )
    prepare = getattr(model, "prepare_inputs", None)
    was_training = model.training
    model.eval()
    try:
        for _ in range(rounds):
            for layer in layers:
                layer.start_bn_calibration()
            with torch.no_grad():
                for index, batch in enumerate(batches):
                    if num_batches is not None and index >= num_batches:
                        break
                    inputs = prepare(batch) if prepare else _as_tuple(batch)
                    model(*inputs)
            for layer in layers:
                layer.finish_bn_calibration()
    finally:
        for layer in layers:
            layer._calibrating = False
        model.train(was_training)
    return len(layers)


def _as_tuple(batch) -> Sequence:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


__all__ = ["BN_STRATEGIES", "QuantConv", "QuantLinear", "QuantWeight", "recalibrate_bn"]
