r"""Learned rounding of the weights: AdaRound (Nagel et al. 2020, "Up or Down?").

Round-to-nearest minimises each weight's own error, not the layer's output error. AdaRound
learns, per weight, whether to round down or up so that the layer's output on the
calibration data stays close to the float layer's. For a weight ``w`` with scale ``s`` and
zero point ``z`` (the PTQ scheme's, per channel where it is)::

    w_soft(V) = s * (clamp(floor(w / s) + z + h(V), qmin, qmax) - z)
    h(V)      = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)     zeta = 1.1, gamma = -0.1

(the rectified sigmoid), and per layer, in graph order::

    min_V  sum_c (f_a(W_soft x_q) - f_a(W x))_c^2  (mean over samples and positions)
           + lambda * sum (1 - |2 h(V) - 1| ^ beta)

with ``f_a`` the ReLU where the layer's output only feeds ReLUs (else the identity),
``lambda = 0.01`` and ``beta`` annealed linearly from 20 to 2 after a warm start (the
first 20 % of the iterations, without the regulariser), Adam on ``V`` (initialised so that
``h(V) = w/s - floor(w/s)``, the fractional part). ``x_q`` is the layer's input in the model
with everything upstream quantized, learned layers included (the paper's asymmetric
reconstruction; ``inputs="float"`` takes the float model's input instead), and ``W x`` the
float model's layer output. At the end ``h(V)`` is hardened to ``V >= 0`` (rounded up).

The layers are the Conv and Gemm nodes with a quantized weight, imported into torch by
:func:`qtool.qat.to_torch` (the QAT importer: the same fake quantization as the QDQ graph).
A layer keeps round-to-nearest when the learned rounding does not lower its reconstruction
error on the data (short budgets can end there); a weight shared by several layers is learned
on its first reader. Weights read by other ops (MatMul) keep round-to-nearest.

The learned integers are written back as float weights on the grid, ``s * (q - z)``, into the
quantized model's float graph: rounding them to nearest reproduces ``q`` exactly, so the
scales, zero points and the rest of the Q/DQ graph are the PTQ model's, assembled by the
same last step as every PTQ (:func:`qtool.qdq.assemble`: graph-output quantizers, opset,
activation method, warnings), and the backend's emitter runs as usual.

The layers run as executor tasks (:mod:`qtool.executor`, ``--workers`` / ``--executor``), in
*waves*: a layer's input depends on the learned rounding of the layers upstream of it (with
``inputs="quantized"``), so a wave holds the layers whose upstream learned layers are all in
earlier waves (parallel branches: a ResNet's shortcut beside its block's first Conv, an
Inception's branches; with ``inputs="float"`` every layer is in the first wave). The driver
captures each layer's input and float output (its forward passes stop at the layer) and
sends those two arrays and a copy of the layer, never the model; at most ``workers`` layers'
arrays are held at once; a layer alone in its wave (a chain) runs in this process. Each
layer draws its batches from its own generator (the seed and its position among the learned
layers), so the learned rounding does not depend on ``workers`` or on where a layer ran; a
task runs on ``threads // workers`` torch threads, and torch's CPU Conv and Gemm (forward and
backward) gave the same bits at 1 and 2 threads (tests/test_parallel_analyses.py compares
the written model's bytes between ``workers=1`` and ``workers=2``).

AdaRound's objective is the layer's output error with everything upstream quantized (the
asymmetric reconstruction), so it already removes the mean error bias correction would
remove: ``qtool calibrate --adaround`` learns the rounding of the uncorrected PTQ model,
never stacks bias correction on it (the mean error would be corrected twice: digits CNN on
tensorrt, held-out SQNR 35.5 dB with AdaRound alone, 33.5 with both), and keeps whichever of
the learned model and the model it would write without ``--adaround`` scores better on the
evaluation data.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
import torch
from torch import nn

from qtool.errors import DataError, PlanError
from qtool.io import to_model
from qtool.qdq import QuantizedModel, assemble

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1
INPUTS = ("quantized", "float")


@dataclass(frozen=True)
class AdaRoundOptions:
    """Options of :func:`adaround`.

    Attributes:
        iterations: Optimisation steps per layer (the paper: 10 000; a few hundred already
            gain most of it on small layers).
        batch_size: Samples per step.
        lr: Adam's learning rate on ``V``.
        reg_weight: ``lambda``, the weight of the rounding regulariser.
        beta: ``(start, end)`` of the annealed regulariser exponent.
        warm_start: Fraction of the iterations without the regulariser.
        samples: At most this many calibration samples (held in memory, one layer at a time).
        inputs: ``quantized`` (upstream quantized, learned layers included) or ``float``.
        activation: Compare after the layer's ReLU where its output only feeds ReLUs (the
            paper's ``f_a``: errors a ReLU clips away do not count).
        device: torch device; None: CUDA when available, else the CPU.
        seed: Seed of the batch order.
    """

    iterations: int = 200
    batch_size: int = 32
    lr: float = 1e-2
    reg_weight: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warm_start: float = 0.2
    samples: int = 256
    inputs: str = "quantized"
    activation: bool = True
    device: str | None = None
    seed: int = 0


@dataclass(frozen=True)
class LayerRounding:
    """What AdaRound did to one layer.

    Attributes:
        layer: The ONNX node name.
        weight: The weight initializer.
        nearest_error: Reconstruction error with round-to-nearest (the objective's first term).
        learned_error: Reconstruction error with the learned rounding.
        changed: Fraction of the weights rounded the other way than to nearest (0 if kept).
        kept_nearest: True when the learned rounding did not help and nearest was kept.
    """

    layer: str
    weight: str
    nearest_error: float
    learned_error: float
    changed: float
    kept_nearest: bool

    def to_dict(self) -> dict:
        """JSON-ready fields (errors rounded to 6 significant digits)."""
        return {"layer": self.layer, "weight": self.weight,
                "nearest_error": float(f"{self.nearest_error:.6g}"),
                "learned_error": float(f"{self.learned_error:.6g}"),
                "changed": round(self.changed, 6), "kept_nearest": self.kept_nearest}


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def initial_v(fraction: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = fraction`` (fractions of 0 or 1 land just inside)."""
    fraction = torch.clamp(fraction, 0.01, 0.99)
    return -torch.log((ZETA - GAMMA) / (fraction - GAMMA) - 1.0)


def beta_at(step: int, iterations: int, options: AdaRoundOptions) -> float | None:
    """The regulariser's exponent at ``step`` (None during the warm start)."""
    start = int(options.warm_start * iterations)
    if step < start:
        return None
    progress = (step - start) / max(1, iterations - start)
    high, low = options.beta
    return low + (high - low) * max(0.0, 1.0 - progress)


class AdaRoundWeight(nn.Module):
    """Stands in for a weight's fake-quant while its rounding is learned.

    Called with the float weight (as :class:`qtool.qat.bn.QuantWeight` calls its quantizer),
    it returns ``w_soft(V)`` while ``soft`` is True and the hardened rounding otherwise.
    """

    def __init__(self, quantizer, weight: torch.Tensor):
        super().__init__()
        with torch.no_grad():
            scale, zero_point = quantizer.effective()
            self.register_buffer("scale", quantizer._view(scale.detach(), weight).clone())
            self.register_buffer("zero_point", quantizer._view(zero_point.detach(), weight).clone())
            scaled = weight.detach() / self.scale
            self.register_buffer("floor", torch.floor(scaled))
        self.quant_min, self.quant_max = quantizer.quant_min, quantizer.quant_max
        self.v = nn.Parameter(initial_v(scaled - self.floor))
        self.soft = True

    def forward(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The weight with the soft (training) or hardened (``V >= 0`` up) rounding."""
        return (self.levels() - self.zero_point) * self.scale

    def levels(self, hard: bool | None = None) -> torch.Tensor:
        """The integer levels (soft: fractional while learning)."""
        hard = not self.soft if hard is None else hard
        up = (self.v >= 0).to(self.floor.dtype) if hard else rectified_sigmoid(self.v)
        return torch.clamp(self.floor + self.zero_point + up, self.quant_min, self.quant_max)

    def nearest_levels(self, weight: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest levels of ``weight`` (what the PTQ graph stores)."""
        return torch.clamp(torch.round(weight / self.scale) + self.zero_point,
                           self.quant_min, self.quant_max)

    def regularizer(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2 h(V) - 1| ^ beta)``: zero when every ``h`` is 0 or 1."""
        return (1.0 - (2.0 * rectified_sigmoid(self.v) - 1.0).abs().pow(beta)).sum()


def reconstruction_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (dim 1), averaged over samples and positions."""
    diff = (output - target).pow(2)
    return diff.sum(dim=1).mean() if diff.ndim > 1 else diff.mean()


def adaround(
    result: QuantizedModel,
    samples: Iterable[Mapping[str, np.ndarray]],
    options: AdaRoundOptions = AdaRoundOptions(),
    executor=None,
) -> tuple[QuantizedModel, list[LayerRounding]]:
    """Learn the rounding of every quantized Conv/Gemm weight of a PTQ model.

    Args:
        result: The post-training quantized model (:func:`qtool.qdq.quantize`).
        samples: Calibration samples: dicts of model input -> array (batch first).
        options: Iterations, batch size, learning rate, regulariser, inputs, device.
        executor: A :class:`qtool.executor.Executor` the layers of a wave run on; None: here.
            The result does not depend on it.

    Returns:
        ``(model, layers)``: the quantized model with the learned weights (same plan, scales
        and zero points), and one :class:`LayerRounding` per learned layer in graph order.

    Raises:
        DataError: No samples, or a sample without a model input.
        PlanError: Bad options.
    """
    from qtool import progress
    from qtool.executor import SerialExecutor
    from qtool.qat.importer import to_torch

    _check(options)
    executor = executor or SerialExecutor()
    model = to_torch(result, "lsq")
    inputs = _stack(samples, model.input_names, options.samples)
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    originals = {name: w.weight.detach().clone() for name, w in model.weights.items()}
    relu_after = _followed_by_relu(result.float_graph)
    learners = _learners(model)
    waves = _waves(result.float_graph, learners, model, options.inputs)
    position = {name: i for i, name in enumerate(learners)}
    reports: dict[str, LayerRounding] = {}
    with progress.bar(total=len(learners), desc="adaround", unit="layer") as bar:
        for wave in waves:
            # at most ``workers`` layers' inputs and targets are held at once
            for first in range(0, len(wave), executor.workers):
                chunk = wave[first : first + executor.workers]
                # a layer alone in its wave runs here, on this process's threads: nothing to
                # run beside it (a chain of layers costs no shipping)
                threads = torch.get_num_threads() if len(chunk) == 1 else \
                    _task_threads(executor.workers)
                tasks = []
                for name in chunk:
                    layer = model.layers[name]
                    x, target = _layer_data(model, layer, inputs, originals, options, device)
                    tasks.append(LayerTask(
                        name, copy.deepcopy(layer).cpu(), x.cpu(), target.cpu(),
                        options.activation and name in relu_after, options,
                        str(device), _layer_seed(options.seed, position[name]), threads))
                    del x, target
                learned = ([learn_layer(tasks[0])] if len(tasks) == 1 else
                           executor.map(learn_layer, tasks, desc="adaround layers",
                                        progress=False))
                del tasks
                for name, (values, report) in zip(chunk, learned, strict=True):
                    with torch.no_grad():
                        model.layers[name].weight.weight.data.copy_(torch.tensor(values))
                    reports[name] = report
                    log.info("adaround %s: error %.4g -> %.4g (%.1f%% of weights flipped%s)",
                             name, report.nearest_error, report.learned_error,
                             100 * report.changed, ", kept nearest" if report.kept_nearest
                             else "")
                bar.update(len(chunk))
    done = {model.layers[name].weight.name for name in learners}
    learned_weights = {w.name: w.weight.detach().cpu().numpy() for w in model.weights.values()
                       if w.name in done}
    return _rebuild(result, learned_weights), [reports[name] for name in learners]


@dataclass(frozen=True)
class LayerTask:
    """One layer's learning, as sent to a worker: the layer and its data, not the model.

    Attributes:
        name: The ONNX node name.
        layer: A copy of the torch layer (its weight, quantizer and bias grid), on the CPU.
        x: The layer's input over the samples (upstream quantized, or float).
        target: The float layer's output over the samples.
        relu: Compare after a ReLU (the layer's output only feeds ReLUs).
        options: AdaRound's options.
        device: Where to learn (``cpu``, ``cuda``).
        seed: Seed of this layer's batch order.
        threads: torch threads while learning (the same whatever the workers).
    """

    name: str
    layer: nn.Module
    x: torch.Tensor
    target: torch.Tensor
    relu: bool
    options: AdaRoundOptions
    device: str
    seed: int
    threads: int


def learn_layer(task: LayerTask) -> tuple[np.ndarray, LayerRounding]:
    """An executor task: the learned on-grid weight of one layer and its report."""
    device = torch.device(task.device)
    before = torch.get_num_threads()
    torch.set_num_threads(task.threads)
    try:
        layer = task.layer.to(device)
        generator = torch.Generator().manual_seed(task.seed)
        report = _learn(layer, task.name, task.x.to(device), task.target.to(device),
                        task.options, generator, torch.relu if task.relu else None)
        return layer.weight.weight.detach().cpu().numpy(), report
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------ helpers


def _check(options: AdaRoundOptions) -> None:
    if options.inputs not in INPUTS:
        raise PlanError(f"AdaRound inputs {options.inputs!r} is not one of {', '.join(INPUTS)}")
    if options.iterations < 1 or options.batch_size < 1 or options.samples < 1:
        raise PlanError("AdaRound needs at least one iteration, batch and sample")


def _learners(model) -> list[str]:
    """The layers whose rounding is learned, in graph order (a shared weight: its first)."""
    names, seen = [], set()
    for name, layer in model.layers.items():
        weight = layer.weight
        if weight.quantizer is None or getattr(layer, "bn", None) is not None \
                or weight.name in seen:
            continue
        seen.add(weight.name)
        names.append(name)
    return names


def _waves(graph: gs.Graph, learners: list[str], model, inputs: str) -> list[list[str]]:
    """``learners`` in waves: a layer after every learner whose weight feeds its input.

    With ``inputs="quantized"`` a layer's input is computed with the learned weights of the
    learners upstream of it (read by any node upstream, a shared weight's other readers
    included), so it waits for them; other layers are independent. Graph order within a
    wave.
    """
    if inputs == "float" or len(learners) < 2:
        return [list(learners)] if learners else []
    learner_of = {model.layers[name].weight.name: name for name in learners}
    nodes = {node.name: node for node in graph.nodes}

    def upstream(node) -> set[str]:
        """Learners whose weight some node upstream of ``node`` reads (iterative DFS)."""
        found: set[str] = set()
        stack, visited = [node], {node.name}
        while stack:
            current = stack.pop()
            for tensor in current.inputs:
                for producer in tensor.inputs:
                    if producer.name in visited:
                        continue
                    visited.add(producer.name)
                    found.update(learner_of[t.name] for t in producer.inputs
                                 if t.name in learner_of)
                    stack.append(producer)
        return found

    depth: dict[str, int] = {}
    for name in learners:
        node = nodes.get(name)
        before = upstream(node) if node is not None else set(learners[: learners.index(name)])
        depth[name] = 1 + max((depth[u] for u in before if u in depth), default=-1)
    waves: list[list[str]] = [[] for _ in range(max(depth.values()) + 1)]
    for name in learners:
        waves[depth[name]].append(name)
    return waves


def _layer_seed(seed: int, position: int) -> int:
    """The seed of the learned layer at ``position``: its own stream, whoever runs it."""
    return (seed * 1_000_003 + position) % (1 << 63)


def _task_threads(workers: int) -> int:
    """Torch threads per layer task: this process's, shared among the workers."""
    return max(1, torch.get_num_threads() // max(1, workers))


def _followed_by_relu(graph: gs.Graph) -> set[str]:
    """Names of the Conv/Gemm nodes whose output only feeds Relu nodes."""
    found = set()
    for node in graph.nodes:
        out = node.outputs[0]
        if node.op in ("Conv", "Gemm") and out.outputs and out not in graph.outputs and \
                all(c.op == "Relu" for c in out.outputs):
            found.add(node.name)
    return found


def _stack(samples, names: list[str], limit: int) -> list[torch.Tensor]:
    columns: dict[str, list[np.ndarray]] = {n: [] for n in names}
    count = 0
    for sample in samples:
        missing = [n for n in names if n not in sample]
        if missing:
            raise DataError(f"a calibration sample lacks model input(s) {', '.join(missing)}")
        for n in names:
            columns[n].append(np.asarray(sample[n], dtype=np.float32))
        count += len(columns[names[0]][-1])
        if count >= limit:
            break
    if count == 0:
        raise DataError("AdaRound got no calibration samples", "give calibration data (--data)")
    return [torch.as_tensor(np.concatenate(columns[n])[:limit]) for n in names]


class _Stop(Exception):
    """Raised by the capture hook: nothing downstream of the layer needs to run."""


def _layer_data(model, layer, inputs, originals, options, device):
    """``(x, target)`` of ``layer`` over all samples: its input and the float output.

    Each forward pass stops at the layer (the hook raises :class:`_Stop`).
    """
    seen: dict[str, list[torch.Tensor]] = {"x": [], "y": []}
    float_pass = {"on": False}

    def hook(module, args, output):
        if float_pass["on"]:
            seen["y"].append(output.detach())
            if options.inputs == "float":
                seen["x"].append(args[0].detach())
        elif options.inputs == "quantized":
            seen["x"].append(args[0].detach())
        raise _Stop

    handle = layer.register_forward_hook(hook)
    learned = {name: w.weight.detach().clone() for name, w in model.weights.items()}
    try:
        with torch.no_grad():
            float_pass["on"] = True
            _set_weights(model, originals)
            model.set_quantization(False)
            _run(model, inputs, options.batch_size, device)
            float_pass["on"] = False
            _set_weights(model, learned)
            model.set_quantization(True)
            if options.inputs == "quantized":
                _run(model, inputs, options.batch_size, device)
    finally:
        handle.remove()
        _set_weights(model, learned)
        model.set_quantization(True)
    return torch.cat(seen["x"]), torch.cat(seen["y"])


def _run(model, inputs, batch_size: int, device) -> None:
    for start in range(0, len(inputs[0]), batch_size):
        try:
            model(*(a[start : start + batch_size].to(device) for a in inputs))
        except _Stop:
            pass


def _set_weights(model, values: dict[str, torch.Tensor]) -> None:
    for name, w in model.weights.items():
        w.weight.data.copy_(values[name])


def _learn(layer, name, x, target, options: AdaRoundOptions, generator,
           activation) -> LayerRounding:
    weight = layer.weight
    if activation is not None:
        target = activation(target)
        layer = _Then(layer, activation)
    quantizer = weight.quantizer
    rounding = AdaRoundWeight(quantizer, weight.weight).to(x.device)
    nearest = rounding.nearest_levels(weight.weight.detach())
    optimizer = torch.optim.Adam([rounding.v], lr=options.lr)
    weight.quantizer = rounding
    try:
        for step in range(options.iterations):
            index = torch.randint(len(x), (min(options.batch_size, len(x)),), generator=generator)
            index = index.to(x.device)
            with torch.enable_grad():
                loss = reconstruction_error(layer(x[index]), target[index])
                beta = beta_at(step, options.iterations, options)
                if beta is not None:
                    loss = loss + options.reg_weight * rounding.regularizer(beta)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        rounding.soft = False
        with torch.no_grad():
            learned_error = _error(layer, x, target, options.batch_size)
            levels = rounding.levels(hard=True)
            rounding.v.data = torch.where(nearest > rounding.floor + rounding.zero_point, 1.0, -1.0)
            nearest_error = _error(layer, x, target, options.batch_size)
    finally:
        weight.quantizer = quantizer
    kept = not learned_error < nearest_error
    changed = 0.0 if kept else float((levels != nearest).float().mean())
    with torch.no_grad():
        chosen = nearest if kept else levels
        weight.weight.data.copy_((chosen - rounding.zero_point) * rounding.scale)
    return LayerRounding(name, weight.name, float(nearest_error), float(learned_error),
                         changed, kept)


class _Then(nn.Module):
    def __init__(self, layer, activation):
        super().__init__()
        self.layer, self.activation = layer, activation

    def forward(self, x):
        return self.activation(self.layer(x))


def _error(layer, x, target, batch_size: int) -> float:
    total, count = 0.0, 0
    for start in range(0, len(x), batch_size):
        part = slice(start, start + batch_size)
        n = len(x[part])
        total += float(reconstruction_error(layer(x[part]), target[part])) * n
        count += n
    return total / max(1, count) if not math.isnan(total) else math.inf


def _rebuild(result: QuantizedModel, learned: dict[str, np.ndarray]) -> QuantizedModel:
    """The PTQ model with the learned on-grid weights in its float graph.

    Built by :func:`qtool.qdq.assemble`, the last step of every PTQ, with the PTQ model's
    plan, scales, backend, activation method and warnings: the graph-output quantizers the
    backend places, the opset its bit widths need and the files it writes (a TensorRT cache
    names the PTQ calibrator) are the PTQ model's.
    """
    float_graph = gs.import_onnx(to_model(result.float_graph))
    tensors = float_graph.tensors()
    for name, values in learned.items():
        old = np.asarray(tensors[name].values)
        tensors[name].values = values.astype(old.dtype).reshape(old.shape)
    return assemble(float_graph, result.plan, result.backend, result.qparams,
                    result.weight_method, result.activation_method, result.warnings)


__all__ = [
    "AdaRoundOptions",
    "AdaRoundWeight",
    "LayerRounding",
    "LayerTask",
    "adaround",
    "beta_at",
    "initial_v",
    "learn_layer",
    "rectified_sigmoid",
    "reconstruction_error",
]
