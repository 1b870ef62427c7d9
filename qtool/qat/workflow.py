"""``qtool qat`` as a library function: PTQ, import, (BN re-calibration), training, export.

    load -> Pipeline(cleanup, fold_bn, upgrade_opset) -> build_plan -> calibrate (the first
    ``calib_samples`` training samples) -> quantize (PTQ) -> to_torch -> [recalibrate_bn]
    -> fit -> export -> the backend's files + plan.json + qat_report.json

Schemes below 8 bits raise the graph to opset 21 first (:data:`NARROW_OPSET`).

The training data is one ``.npz`` with one array per model input (keyed by input name) and
optionally ``labels``: with labels the loss is cross-entropy on the first output; without,
the QAT model is distilled from the float model's outputs, computed once in onnxruntime,
with every output's mean squared error divided by the variance of the float output over
the training data::

    loss = sum_k mean((y_k - t_k)^2) / var(t_k)

so an output in large units (box coordinates in pixels) weighs as much as one in small
units (scores).

QAT is a safe fine-tune of a pretrained model: the defaults are small steps (weights: Adam
at 1e-5; quantizer parameters: 1e-3 of their own magnitude per step, :func:`qtool.qat.fit`),
and the model is scored on held-out data before training (the PTQ start) and after every
epoch, in torch: top-1 of the first output where there are labels, then the SQNR of the
outputs against float (mean over outputs, dB). The best state is exported; when no epoch
beats the start, or the exported graph scores below the PTQ graph in onnxruntime, the PTQ
model itself is written (byte for byte what ``qtool calibrate`` writes from the same
calibration samples: the quantizers copy the PTQ scales, never share them), so the result
is never worse than the PTQ model on the data that chose it. The held-out data is
``eval_data`` (an ``.npz``; with ``labels`` the report also has float, PTQ and QAT top-1),
else the last ``holdout`` fraction of the training samples, which then are not trained on.

The held-out rows are split in two (:data:`SPLIT`): the even rows (0, 2, 4, ...) *select*
(the best epoch, and QAT or PTQ), the odd rows (1, 3, ...) *report* (the scores and top-1
of the report), so the numbers reported were not the ones a choice was made on (a choice
made and measured on the same rows reads better than it is). A single held-out row does
both, and the report says so. The report's ``held_out`` section gives the PTQ and exported
scores on the report rows, the same on the selection rows (``selection``), the per-epoch
selection scores, the best epoch and whether training improved. The output folder is
written whole or not at all.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
import torch

from qtool.errors import DataError

LABELS_KEY = "labels"
#: Below 8 bits the QDQ graph is raised to this opset: INT4/UINT4 storage makes onnxruntime
#: clip to the narrow range (in int8 storage QuantizeLinear saturates at +-127 instead, so
#: the QDQ graph would not compute what the 4-bit torch model computes).
NARROW_OPSET = 21
REPORT_FILE = "qat_report.json"
#: How the held-out rows are split between choosing and reporting (module docstring).
SPLIT = ("even rows (0, 2, ...) choose the best epoch and QAT or PTQ; odd rows (1, 3, ...) "
         "give the scores reported")


@dataclass(frozen=True)
class QatOptions:
    """Options of :func:`qat_model` (the ``qtool qat`` flags).

    Attributes:
        algorithm: ``lsq``, ``lsq+``, ``pact``, ``dorefa``, ``dsq``.
        epochs: Training epochs.
        lr: Peak learning rate of the weights (and BN, biases).
        quant_lr: Peak learning rate of the quantizer parameters, relative to each one's
            magnitude (:func:`qtool.qat.train.parameter_groups`).
        batch_size: Training batch size.
        optimizer: ``adam`` or ``sgd``.
        weight_decay: L2 on all parameters.
        warmup_epochs: Linear learning-rate warm-up.
        bn_strategy: MQBench BN folding strategy 0-4 (1-4 keep the BN of the float model).
        recalibrate_bn: Re-estimate BN statistics after PTQ, before training (strategies 1-4).
        method: Calibration observer for the activation ranges that initialise QAT.
        weight_method: Observer for the initial weight ranges.
        calib_samples: Training samples used for calibration (and BN re-calibration).
        weight_bits: Override the backend's weight bits (e.g. 4).
        act_bits: Override the backend's activation bits.
        skip: Node names, op types or regexes kept float.
        eval_data: Held-out ``.npz`` (labels optional) that chooses the best state and
            scores the report, or None.
        holdout: Without ``eval_data``, the fraction of the training samples held out.
        seed: Seed of torch and of the data order.
    """

    algorithm: str = "lsq"
    epochs: int = 5
    lr: float = 1e-5
    quant_lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adam"
    weight_decay: float = 0.0
    warmup_epochs: float = 1.0
    bn_strategy: int = 0
    recalibrate_bn: bool = False
    method: str = "minmax"
    weight_method: str = "minmax"
    calib_samples: int = 256
    weight_bits: int | None = None
    act_bits: int | None = None
    skip: tuple[str, ...] = ()
    eval_data: str | os.PathLike | None = None
    holdout: float = 0.1
    seed: int = 0


def qat_model(model: str | os.PathLike, backend: str, data: str | os.PathLike,
              options: QatOptions = QatOptions()) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The whole QAT job in memory: the output folder's files and the report.

    Args:
        model: The float ONNX file.
        backend: A registered backend name.
        data: The training ``.npz`` (see the module docstring).
        options: Algorithm, training and calibration options.

    Returns:
        ``(files, report)``: file name -> bytes (the backend's files, ``plan.json`` and
        ``qat_report.json``), and the report as a dict.

    Raises:
        DataError: The data file lacks a model input, or labels do not match the samples.
        QtoolError: Any error of loading, planning, calibration, quantization or training.
    """
    from qtool.calibration import calibrate
    from qtool.io import load
    from qtool.pipeline import Pipeline
    from qtool.planner import build_plan
    from qtool.prepare import prepare
    from qtool.qat.bn import recalibrate_bn
    from qtool.qat.importer import to_torch
    from qtool.qat.train import fit
    from qtool.qdq import quantize

    torch.manual_seed(options.seed)
    graph, _ = prepare(load(model))
    plan = build_plan(graph, backend, skip=options.skip, weight_bits=options.weight_bits,
                      act_bits=options.act_bits)
    opset = graph.opset
    if graph.opset < NARROW_OPSET and any(e.scheme.bits < 8 for e in plan.tensors.values()):
        graph, _ = Pipeline([("upgrade_opset", {"target": NARROW_OPSET})]).run(graph)
        plan = build_plan(graph, backend, skip=options.skip, weight_bits=options.weight_bits,
                          act_bits=options.act_bits)
    names = [t.name for t in graph.inputs]
    inputs, labels = read_arrays(data, names)
    count = len(inputs[0])
    held = _held_out(options, names, inputs, labels)
    if options.eval_data is None:
        keep = count - len(held.inputs[0])
        inputs = [a[:keep] for a in inputs]
        labels = labels[:keep] if labels is not None else None
    calib = [{n: a[i : i + 1] for n, a in zip(names, inputs, strict=True)}
             for i in range(min(len(inputs[0]), options.calib_samples))]
    ranges = calibrate(graph, plan.activation_schemes(), calib, method=options.method,
                       progress=False)
    ptq = quantize(graph, backend, ranges, plan=plan, weight_method=options.weight_method,
                   activation_method=options.method)
    bn_graph = None
    if options.bn_strategy:
        bn_graph, _ = Pipeline(
            ["cleanup", ("upgrade_opset", {"target": max(13, graph.opset)})]
        ).run(load(model))
    qat = to_torch(ptq, options.algorithm, bn_graph=bn_graph, bn_strategy=options.bn_strategy)
    if options.recalibrate_bn:
        recalibrate_bn(qat, [tuple(a[: options.calib_samples] for a in inputs)])

    if labels is not None:
        targets: tuple[torch.Tensor, ...] = (torch.as_tensor(labels),)
        loss_fn = _first_output(torch.nn.functional.cross_entropy)
    else:
        outputs = run_onnx(graph, dict(zip(names, inputs, strict=True)))
        targets = tuple(torch.as_tensor(o) for o in outputs)
        loss_fn = normalized_distillation([float(np.var(o)) for o in outputs])
    from qtool.calibration.batching import resolve_batch_size
    from qtool.calibration.data import model_inputs

    # a model that fixes its batch dim (torch.onnx.export's default) trains on that size
    train_batch, fixed = resolve_batch_size(model_inputs(graph), options.batch_size)
    loader = torch.utils.data.DataLoader(
        _Samples([torch.as_tensor(a) for a in inputs], targets),
        batch_size=train_batch, shuffle=True, drop_last=fixed,
        generator=torch.Generator().manual_seed(options.seed),
    )
    selection, reported = held.split()
    selection.reference = run_onnx(graph, selection.feeds())
    reported.reference = run_onnx(graph, reported.feeds())
    keeper = _BestState(qat, selection, reported)
    history = fit(qat, loader, loss_fn, epochs=options.epochs, lr=options.lr,
                  optimizer=options.optimizer, weight_decay=options.weight_decay,
                  warmup_epochs=options.warmup_epochs, quant_lr=options.quant_lr,
                  on_epoch=keeper.update)
    result, choice = keeper.result(ptq)
    files = dict(result.files())
    report: dict[str, Any] = {
        "model": Path(model).as_posix(),
        "backend": backend,
        "data": Path(data).as_posix(),
        "samples": count,
        "opset": {"model": opset, "quantized": graph.opset},
        "loss": "cross_entropy on labels" if labels is not None else
                "mse to the float outputs, each divided by its variance",
        "options": {k: (list(v) if isinstance(v, tuple) else
                        (Path(v).as_posix() if isinstance(v, os.PathLike) else v))
                    for k, v in asdict(options).items()},
        "epoch_losses": [round(x, 6) for x in history],
        "held_out": choice,
    }
    if reported.labels is not None:
        feeds = reported.feeds()
        report["accuracy"] = {
            name: accuracy(g, feeds, reported.labels)
            for name, g in (("float", graph), ("ptq", ptq.graph), ("qat", result.graph))
        }
    files[REPORT_FILE] = (json.dumps(report, indent=2) + "\n").encode("utf-8")
    return dict(sorted(files.items())), report


def qat_to_folder(model: str | os.PathLike, backend: str, data: str | os.PathLike,
                  output: str | os.PathLike, options: QatOptions = QatOptions(), *,
                  force: bool = False) -> tuple[Path, dict[str, Any]]:
    """:func:`qat_model`, written atomically into ``output`` (replaced only with ``force``).

    Returns:
        ``(folder, report)``.

    Raises:
        OutputError: The folder exists and is not empty (without ``force``) or cannot be
            written; nothing is left behind.
    """
    from qtool.output import fill_folder, staging_folder

    folder = Path(output)
    with staging_folder(folder, force=force) as staging:
        files, report = qat_model(model, backend, data, options)
        fill_folder(staging, files)
    return folder, report


def normalized_distillation(variances: list[float]):
    """``loss(outputs, targets) = sum_k mse(outputs[k], targets[k]) / variances[k]``.

    A zero variance (a constant output) counts as 1.
    """
    weights = [1.0 / v if v > 0 else 1.0 for v in variances]

    def loss_fn(output, target):
        output = output if isinstance(output, (tuple, list)) else (output,)
        target = target if isinstance(target, (tuple, list)) else (target,)
        return sum(w * torch.nn.functional.mse_loss(o, t)
                   for w, o, t in zip(weights, output, target, strict=True))

    return loss_fn


def sqnr_db(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    """Mean over outputs of ``10 log10(sum x^2 / sum (x - y)^2)`` (equal outputs: 200 dB)."""
    values = []
    for x, y in zip(reference, outputs, strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        noise, signal = float(np.sum((x - y) ** 2)), float(np.sum(x * x))
        values.append(200.0 if noise == 0.0 else
                      (10.0 * np.log10(signal / noise) if signal > 0 else -200.0))
    return float(np.mean(values))


@dataclass
class _HeldOut:
    names: list[str]
    inputs: list[np.ndarray]
    labels: np.ndarray | None
    source: str
    reference: list[np.ndarray] | None = None

    def feeds(self) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.inputs, strict=True))

    def split(self) -> tuple[_HeldOut, _HeldOut]:
        """``(selection rows, report rows)``: the even and the odd rows (:data:`SPLIT`).

        A single row is both.
        """
        if len(self.inputs[0]) < 2:
            return self, self

        def rows(start: int) -> _HeldOut:
            return _HeldOut(self.names, [a[start::2] for a in self.inputs],
                            self.labels[start::2] if self.labels is not None else None,
                            self.source)

        return rows(0), rows(1)

    def score(self, outputs: list[np.ndarray]) -> dict[str, float]:
        """``{"accuracy": top-1 (with labels), "sqnr_db": ...}`` of outputs against float."""
        scores = {}
        if self.labels is not None:
            scores["accuracy"] = float((outputs[0].argmax(axis=1) == self.labels).mean())
        scores["sqnr_db"] = round(sqnr_db(self.reference, outputs), 4)
        return scores


def _held_out(options: QatOptions, names, inputs, labels) -> _HeldOut:
    if options.eval_data is not None:
        held_inputs, held_labels = read_arrays(options.eval_data, names)
        return _HeldOut(names, held_inputs, held_labels, Path(options.eval_data).as_posix())
    count = len(inputs[0])
    if not 0.0 < options.holdout < 1.0:
        raise DataError(f"holdout {options.holdout} is not a fraction between 0 and 1")
    size = max(1, round(options.holdout * count))
    if size >= count:
        raise DataError(f"{count} training sample(s) leave none to train on after holding out "
                        f"{size}", "give more samples, or held-out data with --eval-data")
    return _HeldOut(names, [a[count - size :] for a in inputs],
                    labels[count - size :] if labels is not None else None,
                    f"the last {size} training samples")


def _rank(scores: dict[str, float]) -> tuple[float, ...]:
    return (scores.get("accuracy", 0.0), scores["sqnr_db"])


class _BestState:
    """Scores the model on the selection rows after each epoch and keeps the best state."""

    def __init__(self, model, selection: _HeldOut, reported: _HeldOut):
        self.model, self.selection, self.reported = model, selection, reported
        self.scores = [self._score()]  # epoch 0: the PTQ start
        self.best_epoch, self.best_state = 0, None

    def _score(self) -> dict[str, float]:
        model = self.model
        model.eval()
        batches = []
        with torch.no_grad():
            size = len(self.selection.inputs[0])
            for start in range(0, size, 256):
                out = model(*(torch.as_tensor(a[start : start + 256])
                              for a in self.selection.inputs))
                out = out if isinstance(out, (tuple, list)) else (out,)
                batches.append([o.detach().cpu().numpy() for o in out])
        outputs = [np.concatenate(parts) for parts in zip(*batches, strict=True)]
        return self.selection.score(outputs)

    def update(self, epoch: int, loss: float) -> None:
        """``fit``'s ``on_epoch``: score, and keep the state if it beats the best so far."""
        scores = self._score()
        self.scores.append(scores)
        if _rank(scores) > _rank(self.scores[self.best_epoch]):
            self.best_epoch = epoch
            self.best_state = copy.deepcopy(self.model.state_dict())

    def result(self, ptq):
        """``(the model to write, the report's held_out section)``."""
        from qtool.qat.export import export

        feeds = self.selection.feeds()
        before = self.selection.score(run_onnx(ptq.graph, feeds))
        chosen, after = ptq, before
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
            exported = export(self.model)
            scores = self.selection.score(run_onnx(exported.graph, feeds))
            if _rank(scores) > _rank(before):
                chosen, after = exported, scores
        improved = chosen is not ptq
        same = self.reported is self.selection
        reported_feeds = self.reported.feeds()
        reported_before = self.reported.score(run_onnx(ptq.graph, reported_feeds))
        reported_after = (self.reported.score(run_onnx(chosen.graph, reported_feeds))
                          if improved else reported_before)
        return chosen, {
            "data": self.selection.source,
            "samples": len(self.selection.inputs[0]) + (
                0 if same else len(self.reported.inputs[0])),
            "split": ("one held-out row: it chose and is reported (no split possible)"
                      if same else SPLIT),
            "ranked_by": ("top-1, then " if self.selection.labels is not None else "") +
                         "SQNR of the outputs against float (mean over outputs, dB)",
            "ptq": reported_before,
            "qat": reported_after,
            "selection": {"samples": len(self.selection.inputs[0]), "ptq": before,
                          "qat": after},
            "epochs": self.scores,
            "best_epoch": self.best_epoch if improved else 0,
            "improved": improved,
            "exported": "qat" if improved else "ptq (training did not improve on it)",
        }


def read_arrays(path: str | os.PathLike, names: list[str]):
    """``([one array per input], labels or None)`` from an ``.npz``.

    Raises:
        DataError: Not an .npz, an input missing, or sample counts that differ.
    """
    path = Path(path)
    if path.suffix.lower() != ".npz" or not path.is_file():
        raise DataError(f"{path}: QAT data must be an .npz file",
                        "save one array per model input (and 'labels') with numpy.savez")
    with np.load(path, allow_pickle=False) as archive:
        missing = [n for n in names if n not in archive.files]
        if missing:
            raise DataError(f"{path}: no array for model input(s) {', '.join(missing)}",
                            f"the archive has {', '.join(archive.files) or 'nothing'}")
        inputs = [np.ascontiguousarray(archive[n], dtype=np.float32) for n in names]
        labels = archive[LABELS_KEY].reshape(-1).astype(np.int64) if LABELS_KEY in archive.files \
            else None
    counts = {len(a) for a in inputs} | ({len(labels)} if labels is not None else set())
    if len(counts) != 1 or 0 in counts:
        raise DataError(f"{path}: the arrays hold different or zero numbers of samples",
                        "give every input and the labels the same first dimension")
    return inputs, labels


def run_onnx(graph: gs.Graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of a graph in onnxruntime with graph optimizations off.

    A model with a fixed batch dim runs the rows in batches of that size (the shared
    :func:`qtool.calibration.batching.batches`), the outputs joined along axis 0.
    """
    from qtool.analysis.common import run, session
    from qtool.calibration.batching import batches, resolve_batch_size
    from qtool.calibration.data import model_inputs
    from qtool.io import serialize

    runner = session(serialize(graph))
    names = [o.name for o in runner.get_outputs()]
    specs = model_inputs(graph)
    size, fixed = resolve_batch_size(specs, None)
    if not fixed:
        return run(runner, names, feeds, "on the QAT data")
    parts = [run(runner, names, b.feeds, f"on the QAT samples {b.first}..")
             for b in batches([feeds], specs, size, fixed=True)]
    return [np.concatenate(values) for values in zip(*parts, strict=True)]


def accuracy(graph: gs.Graph, feeds: dict[str, np.ndarray], labels: np.ndarray) -> float:
    """Top-1 accuracy of the first output in onnxruntime (optimizations off)."""
    logits = run_onnx(graph, feeds)[0]
    return float((logits.argmax(axis=1) == labels).mean())


class _Samples(torch.utils.data.Dataset):
    def __init__(self, inputs: list[torch.Tensor], targets: tuple[torch.Tensor, ...]):
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs[0])

    def __getitem__(self, index):
        target = tuple(t[index] for t in self.targets)
        return tuple(a[index] for a in self.inputs), target[0] if len(target) == 1 else target


def _first_output(loss):
    def loss_fn(output, target):
        if isinstance(output, (tuple, list)):
            output = output[0]
        return loss(output, target)

    return loss_fn


__all__ = [
    "QatOptions",
    "accuracy",
    "normalized_distillation",
    "qat_model",
    "qat_to_folder",
    "read_arrays",
    "run_onnx",
    "sqnr_db",
]
