r"""Task metrics: judge a quantized model by what its outputs are for, beside the SQNR.

A task names how a model's outputs are read; its metric streams over the data like an
observer (``update(float_outputs, quant_outputs, labels)``, ``merge``, ``result``) and keeps
counts, never the outputs. Three tasks:

* ``classify`` (a rank-2 ``[N, classes]`` output): top-1 agreement with float, the fraction
  of rows whose argmax is the same in both models; with labels (one class index per row)
  each model's top-1 accuracy. Drop = float accuracy - quantized accuracy with labels, else
  100 - top-1 agreement (the rows whose class changed), in points.
* ``ctc`` (a ``[T, N, C]`` or ``[N, T, C]`` logits output; the batch axis is the one whose
  size is the batch's row count): greedy CTC decoding, argmax per step, repeats collapsed,
  blanks (index ``blank``, default 0) dropped. With ``d`` the Levenshtein distance
  (insertions, deletions, substitutions cost 1) and ``ref`` the reference sequences,

      CER = sum_lines d(decoded, ref) / sum_lines len(ref)
      line accuracy = fraction of lines with decoded == ref

  against the float model's decode, and with labels (an int array ``[N, L]`` of class
  indices padded with -1) against the truth for both models. Drop = 100 * (quantized CER -
  float CER) against the labels, else 100 * CER against the float decode: a CER rise in
  points.
* ``detect``: the model's own decoding (a recipe: a Python file with ``decode(outputs) ->
  [(boxes[K, 4] xyxy, scores[K], classes[K]) per image]``, or the built-in decoder of
  outputs that already are boxes/scores/classes) turns both models' outputs into
  detections; the float model's detections are the ground truth. mAP@0.5: per class, the
  quantized detections sorted by score, highest first; one is a true positive when its IoU
  with the best-overlapping unmatched float box of its image and class is ``>= iou``
  (default 0.5; a detection whose best box is already matched is a false positive); VOC
  all-point interpolated AP

      AP = sum_k (r_k - r_{k-1}) * max_{k' >= k} p_{k'}

  averaged over the classes the float model detects. Drop = 100 * (1 - mAP). Memory: one
  (score, hit) pair per quantized detection. A YOLO-style output (``output=NAME``,
  ``[N, 4 + C, A]`` or ``[N, A, 4 + C]``: box ``cx, cy, w, h`` (``box_format``) then C class
  scores per anchor) has a built-in decoder (:class:`YoloDecoder`): per anchor the best class,
  kept when its score is ``>= score_threshold`` (default 0.25), then greedy NMS per class at
  IoU ``nms_iou`` (default 0.7), as ultralytics decodes.

``ctc`` also counts the per-step top-1 agreement (``step_agreement``): the fraction of
steps whose argmax is the same in both models, for any ``[N, T, C]`` sequence of
log-probabilities (a recurrent decoder) as much as for CTC.

``auto`` recognises the task from the float model's outputs on the first batch
(:func:`recognize`): a YOLO-style output (scores in [0, 1] beside decoded pixel boxes) is
``detect``, a rank-3 output of log-probabilities or probabilities per step is ``ctc``, a
``[N, classes]`` output is ``classify``; otherwise there is no task metric. ``none`` is no
task.

Options come as ``KEY=VALUE`` (``--task-option``), typed by their defaults; an unknown key
is a :class:`~qtool.errors.TaskError` that lists the task's options.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qtool.errors import TaskError
from qtool.keyvalue import option_pairs

#: Each task's options and their defaults (the defaults give the types).
TASK_OPTIONS: dict[str, dict[str, Any]] = {
    "classify": {"output": ""},
    "ctc": {"output": "", "blank": 0, "layout": "auto"},
    "detect": {"decoder": "", "boxes": "", "scores": "", "classes": "", "min_score": 0.0,
               "iou": 0.5, "output": "", "box_format": "cxcywh", "score_threshold": 0.25,
               "nms_iou": 0.7, "objectness": False},
    "auto": {},
    "none": {},
}
TASK_NAMES = tuple(TASK_OPTIONS)
AUTO_TASK = "auto"
NO_TASK = "none"
BOX_FORMATS = ("cxcywh", "xyxy")
CTC_LAYOUTS = ("auto", "tnc", "ntc")
DECODER_FUNCTION = "decode"


@dataclass
class TaskResult:
    """What a task metric measured.

    Attributes:
        task: The task name.
        output: The output(s) it read (``detect``: the decoder file, or the outputs).
        metrics: Named values (fractions in [0, 1]; None where undefined).
        drop: Points the quantized model lost on the task (see the module docstring), or
            None where it is undefined (the float model detects nothing; no characters).
        judged_by: What ``drop`` measures, in words.
        recognized: Whether the task was recognised from the outputs (``auto``), not given.
    """

    task: str
    output: str
    metrics: dict[str, float | int | None]
    drop: float | None
    judged_by: str
    recognized: bool = False


@dataclass(frozen=True)
class Task:
    """A task and its typed options; :meth:`metric` gives a fresh streaming metric.

    Picklable (a decoder is loaded from its file where the metric is made), so evaluation
    shards in other processes make their own.
    """

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def option(self, key: str) -> Any:
        """The option's value (its default when not given)."""
        return dict(self.options).get(key, TASK_OPTIONS[self.name][key])

    def metric(self) -> ClassifyMetric | CTCMetric | DetectMetric | AutoMetric:
        """A fresh metric of this task."""
        if self.name == AUTO_TASK:
            return AutoMetric()
        if self.name == "classify":
            return ClassifyMetric(self.option("output") or None)
        if self.name == "ctc":
            return CTCMetric(self.option("output") or None, self.option("blank"),
                             self.option("layout"))
        spec = self.option("decoder")
        source = Path(spec).name if spec else ", ".join(
            self.option(k) for k in ("boxes", "scores", "classes", "output") if self.option(k))
        return DetectMetric(self.decoder(), self.option("iou"), source)

    def decoder(self) -> Callable[[dict[str, np.ndarray]], list]:
        """``detect``: the recipe's decode function, or the built-in box decoder."""
        spec = self.option("decoder")
        if spec:
            return load_decoder(spec)
        if self.option("output"):
            return YoloDecoder(self.option("output"), self.option("box_format"),
                               self.option("score_threshold"), self.option("nms_iou"),
                               self.option("objectness"))
        return BoxDecoder(self.option("boxes"), self.option("scores"),
                          self.option("classes") or None, self.option("min_score"))

    def check_outputs(self, outputs: Mapping[str, int | None]) -> None:
        """Refuse options naming outputs the model lacks (``outputs``: name -> rank or None).

        Ranks are not checked here: exporters often declare them wrong (ddddocr declares
        ``[1, -1]`` for ``[T, 1, C]`` logits); the metric checks the arrays it gets.

        Raises:
            TaskError: A named output is missing.
        """
        names = ", ".join(outputs) or "none"
        keys = {"classify": ("output",), "ctc": ("output",), AUTO_TASK: (),
                "detect": ("boxes", "scores", "classes", "output")}[self.name]
        for key in keys:
            value = self.option(key)
            if value and value not in outputs:
                raise TaskError(f"--task {self.name}: the model has no output {value!r} "
                                f"({key}=)", f"its outputs: {names}")


def resolve_task(task: str | Task | None, options: Mapping[str, Any] | Sequence[str] = (),
                 decoder: str | None = None) -> Task | None:
    """A :class:`Task` from a name and ``KEY=VALUE`` options (``--task``, ``--task-option``).

    Args:
        task: ``classify``, ``ctc``, ``detect``, a Task (returned as is), or None.
        options: ``("blank=0", ...)`` or a mapping; values typed by the defaults.
        decoder: ``detect``: ``FILE.py`` or ``FILE.py:FUNCTION`` (``--task-decoder``).

    Returns:
        The task, or None when ``task`` is None.

    Raises:
        TaskError: An unknown task or option key, a bad value, options without a task, a
            decoder that does not load, or ``detect`` with neither a decoder nor outputs.
    """
    if isinstance(task, Task):
        return task
    if task is None:
        if options or decoder:
            raise TaskError("--task-option and --task-decoder need --task",
                            f"add --task {'detect' if decoder else 'ctc'} (tasks: "
                            f"{', '.join(TASK_NAMES)})")
        return None
    if task not in TASK_OPTIONS:
        raise TaskError(f"unknown task {task!r}", f"choose one of: {', '.join(TASK_NAMES)}")
    if task == NO_TASK and not (options or decoder):
        return None
    parsed = _parse(task, options)
    if decoder:
        if task != "detect":
            raise TaskError(f"--task-decoder is for --task detect, not {task}",
                            "drop --task-decoder")
        parsed["decoder"] = str(decoder)
    if task == "ctc" and parsed.get("layout", "auto") not in CTC_LAYOUTS:
        raise TaskError(f"--task ctc: layout={parsed['layout']} is not one of "
                        f"{', '.join(CTC_LAYOUTS)}", "tnc: [T, N, C]; ntc: [N, T, C]")
    if task == "detect":
        if parsed.get("decoder"):
            load_decoder(parsed["decoder"])  # fails now, not in the middle of a run
        elif not (parsed.get("boxes") and parsed.get("scores")) and not parsed.get("output"):
            raise TaskError(
                "--task detect needs the model's decoding",
                "give --task-decoder FILE.py[:FUNCTION], --task-option output=OUTPUT for a "
                "YOLO-style [N, 4+C, A] output, or --task-option boxes=OUTPUT "
                "--task-option scores=OUTPUT for outputs that already are boxes and scores",
            )
        if parsed.get("box_format", "cxcywh") not in BOX_FORMATS:
            raise TaskError(f"--task detect: box_format={parsed['box_format']} is not one of "
                            f"{', '.join(BOX_FORMATS)}", "ultralytics exports cxcywh")
        if not 0.0 < parsed.get("iou", 0.5) <= 1.0:
            raise TaskError(f"--task detect: iou={parsed['iou']} is not in (0, 1]",
                            "mAP@0.5 uses iou=0.5")
    return Task(task, tuple(sorted(parsed.items())))


def _parse(task: str, options: Mapping[str, Any] | Sequence[str]) -> dict[str, Any]:
    known = TASK_OPTIONS[task]
    listed = ", ".join(f"{k} (default {v!r})" for k, v in known.items())
    try:
        pairs = option_pairs(options)
    except ValueError as exc:
        raise TaskError(f"task option {exc.args[0]!r} is not KEY=VALUE",
                        f"--task {task} options: {listed}") from None
    parsed: dict[str, Any] = {}
    for key, value in pairs:
        if key not in known:
            raise TaskError(f"task {task} has no option {key}", f"its options: {listed}")
        kind = type(known[key])
        try:
            parsed[key] = kind(value) if not isinstance(value, kind) else value
        except (TypeError, ValueError) as exc:
            raise TaskError(f"task option {key}={value!r} is not a {kind.__name__}",
                            f"--task {task} options: {listed}") from exc
    return parsed


def load_decoder(spec: str) -> Callable[[dict[str, np.ndarray]], list]:
    """The function of a decoder recipe ``FILE.py`` (function ``decode``) or ``FILE.py:NAME``.

    Raises:
        TaskError: The file is missing, does not import, or lacks the function.
    """
    path, _, name = str(spec).rpartition(":") if _has_function(spec) else (spec, "", "")
    name = name or DECODER_FUNCTION
    file = Path(path)
    if not file.is_file():
        raise TaskError(f"decoder file {file} not found",
                        "give --task-decoder FILE.py[:FUNCTION]")
    digest = hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:12]
    loader_spec = importlib.util.spec_from_file_location(f"qtool_task_decoder_{digest}", file)
    module = importlib.util.module_from_spec(loader_spec)
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:  # the recipe's own error, shown in one line
        raise TaskError(f"decoder file {file} does not import: {type(exc).__name__}: {exc}",
                        "fix the file (run it with python to see the traceback)") from exc
    function = getattr(module, name, None)
    if not callable(function):
        raise TaskError(f"decoder file {file} has no function {name}()",
                        f"define def {name}(outputs): ... returning one (boxes, scores, "
                        "classes) per image, or name it as FILE.py:FUNCTION")
    return function


def _has_function(spec: str) -> bool:
    head, sep, tail = str(spec).rpartition(":")
    return bool(sep) and bool(head) and tail.isidentifier()


# -- classify ------------------------------------------------------------------------------


class Top1Counts:
    """Running top-1 counts of one classifier output: rows, agreement, correct with labels."""

    def __init__(self) -> None:
        self.rows = 0
        self.agree = 0
        self.labelled = 0
        self.float_correct = 0
        self.quant_correct = 0

    def update(self, x: np.ndarray, q: np.ndarray, labels: np.ndarray | None) -> None:
        """Add one batch of float and quantized ``[N, classes]`` outputs."""
        fx = np.argmax(x, axis=-1).reshape(-1)
        fq = np.argmax(q, axis=-1).reshape(-1)
        self.rows += int(fx.size)
        self.agree += int(np.sum(fx == fq))
        if labels is not None and np.ndim(labels) <= 1:  # class labels (not CTC sequences)
            truth = np.asarray(labels).reshape(-1)
            self.labelled += int(fx.size)
            self.float_correct += int(np.sum(fx == truth))
            self.quant_correct += int(np.sum(fq == truth))

    def merge(self, other: Top1Counts) -> None:
        """Add another shard's counts."""
        for key in ("rows", "agree", "labelled", "float_correct", "quant_correct"):
            setattr(self, key, getattr(self, key) + getattr(other, key))


class ClassifyMetric:
    """Top-1 agreement and, with labels, accuracy of one ``[N, classes]`` output."""

    def __init__(self, output: str | None = None) -> None:
        self.output = output
        self.counts = Top1Counts()

    def update(self, float_outputs: Mapping[str, np.ndarray],
               quant_outputs: Mapping[str, np.ndarray], labels: np.ndarray | None,
               rows: int | None = None) -> None:
        """Add one batch (``rows`` unused: one row per argmax)."""
        if self.output is None:
            self.output = _first(float_outputs, lambda x: x.ndim == 2 and x.shape[1] > 1,
                                 "classify", "an [N, classes] output")
        self.counts.update(float_outputs[self.output], quant_outputs[self.output], labels)

    def merge(self, other: ClassifyMetric) -> None:
        """Add another shard's counts."""
        self.output = self.output or other.output
        self.counts.merge(other.counts)

    def result(self) -> TaskResult:
        """Top-1 agreement, accuracies; the accuracy drop, or without labels the disagreement."""
        c = self.counts
        metrics: dict[str, float | int | None] = {"top1_agreement": _ratio(c.agree, c.rows)}
        if c.labelled:
            metrics["float_accuracy"] = _ratio(c.float_correct, c.labelled)
            metrics["quant_accuracy"] = _ratio(c.quant_correct, c.labelled)
            drop = 100.0 * (c.float_correct - c.quant_correct) / c.labelled
            return TaskResult("classify", self.output or "", metrics, drop,
                              "top-1 accuracy drop against the labels")
        drop = 100.0 * (c.rows - c.agree) / c.rows if c.rows else None
        return TaskResult("classify", self.output or "", metrics, drop,
                          "top-1 disagreement with the float model")


# -- ctc -----------------------------------------------------------------------------------


def greedy_ctc(logits: np.ndarray, blank: int = 0, batch_axis: int = 0) -> list[list[int]]:
    """Greedy CTC decoding of ``[N, T, C]`` (``batch_axis=0``) or ``[T, N, C]`` logits.

    Returns:
        One index sequence per row: argmax per step, repeats collapsed, blanks dropped.
    """
    best = np.argmax(logits, axis=-1)
    if batch_axis == 1:
        best = best.T
    lines = []
    for row in best:
        keep = np.ones(row.shape, bool)
        keep[1:] = row[1:] != row[:-1]
        lines.append([int(i) for i in row[keep & (row != blank)]])
    return lines


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance of two sequences (each edit costs 1)."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


class _Lines:
    """Edit-distance counts of decoded lines against reference lines."""

    def __init__(self) -> None:
        self.lines = 0
        self.errors = 0
        self.chars = 0
        self.exact = 0

    def add(self, decoded: Sequence[int], reference: Sequence[int]) -> None:
        distance = edit_distance(decoded, reference)
        self.lines += 1
        self.errors += distance
        self.chars += len(reference)
        self.exact += int(distance == 0)

    def merge(self, other: _Lines) -> None:
        for key in ("lines", "errors", "chars", "exact"):
            setattr(self, key, getattr(self, key) + getattr(other, key))

    @property
    def cer(self) -> float | None:
        if self.chars == 0:
            return 0.0 if self.errors == 0 and self.lines else None
        return self.errors / self.chars

    @property
    def line_accuracy(self) -> float | None:
        return _ratio(self.exact, self.lines)


class CTCMetric:
    """CER and line accuracy of greedy CTC decodes (see the module docstring)."""

    def __init__(self, output: str | None = None, blank: int = 0, layout: str = "auto"):
        self.output = output
        self.blank = blank
        self.layout = layout
        self.vs_float = _Lines()
        self.float_truth = _Lines()
        self.quant_truth = _Lines()
        self.steps = 0
        self.steps_agree = 0

    def update(self, float_outputs: Mapping[str, np.ndarray],
               quant_outputs: Mapping[str, np.ndarray], labels: np.ndarray | None,
               rows: int | None = None) -> None:
        """Decode one batch of both models and count the edits (``rows``: the batch's rows)."""
        if self.output is None:
            self.output = _first(float_outputs, lambda x: x.ndim == 3, "ctc",
                                 "a [T, N, C] or [N, T, C] output")
        x, q = float_outputs[self.output], quant_outputs[self.output]
        if rows is None and labels is not None:
            rows = int(np.shape(labels)[0])
        axis = self._batch_axis(x, rows)
        same = np.argmax(x, axis=-1) == np.argmax(q, axis=-1)
        self.steps += int(same.size)
        self.steps_agree += int(np.sum(same))
        decoded_float = greedy_ctc(x, self.blank, axis)
        decoded_quant = greedy_ctc(q, self.blank, axis)
        for fl, ql in zip(decoded_float, decoded_quant, strict=True):
            self.vs_float.add(ql, fl)
        if labels is None:
            return
        truth = np.asarray(labels).reshape(len(decoded_float), -1)
        for fl, ql, row in zip(decoded_float, decoded_quant, truth, strict=True):
            reference = [int(v) for v in row if v >= 0]
            self.float_truth.add(fl, reference)
            self.quant_truth.add(ql, reference)

    def _batch_axis(self, x: np.ndarray, rows: int | None) -> int:
        if x.ndim != 3:
            raise TaskError(f"--task ctc: output {self.output!r} has shape {list(x.shape)}, "
                            "not [T, N, C] or [N, T, C]", "name the logits output with "
                            "--task-option output=NAME")
        if self.layout != "auto":
            return 0 if self.layout == "ntc" else 1
        if rows is None:  # [T, 1, C]: one line of T steps (a fixed batch of 1)
            return 1 if x.shape[1] == 1 and x.shape[0] > 1 else 0
        if x.shape[0] == rows:
            return 0
        if x.shape[1] == rows:
            return 1
        raise TaskError(f"--task ctc: output {self.output!r} has shape {list(x.shape)}, with "
                        f"no axis of the batch's {rows} rows",
                        "give --task-option layout=tnc or layout=ntc")

    def merge(self, other: CTCMetric) -> None:
        """Add another shard's counts."""
        self.output = self.output or other.output
        self.vs_float.merge(other.vs_float)
        self.float_truth.merge(other.float_truth)
        self.quant_truth.merge(other.quant_truth)
        self.steps += other.steps
        self.steps_agree += other.steps_agree

    def result(self) -> TaskResult:
        """CER and line accuracy against float (and the labels); the CER rise in points."""
        metrics: dict[str, float | int | None] = {
            "cer": self.vs_float.cer, "line_accuracy": self.vs_float.line_accuracy,
            "step_agreement": _ratio(self.steps_agree, self.steps)}
        if self.float_truth.lines:
            metrics.update({
                "float_cer": self.float_truth.cer, "quant_cer": self.quant_truth.cer,
                "float_line_accuracy": self.float_truth.line_accuracy,
                "quant_line_accuracy": self.quant_truth.line_accuracy,
            })
            if self.float_truth.chars == 0:
                return TaskResult("ctc", self.output or "", metrics, None,
                                  "CER rise against the labels")
            drop = 100.0 * (self.quant_truth.errors - self.float_truth.errors) / (
                self.float_truth.chars)
            return TaskResult("ctc", self.output or "", metrics, drop,
                              "CER rise against the labels")
        cer = self.vs_float.cer
        return TaskResult("ctc", self.output or "", metrics,
                          None if cer is None else 100.0 * cer,
                          "CER against the float model's decode")


# -- detect --------------------------------------------------------------------------------


class BoxDecoder:
    """The built-in decoder of outputs that already are detections.

    ``boxes``: ``[N, K, 4]`` xyxy (or ``[K, 4]`` for one image), ``scores``: ``[N, K]`` (or
    ``[K]``), ``classes``: like scores (None: class 0); detections below ``min_score`` are
    dropped.
    """

    def __init__(self, boxes: str, scores: str, classes: str | None, min_score: float = 0.0):
        self.boxes, self.scores, self.classes, self.min_score = boxes, scores, classes, min_score

    def __call__(self, outputs: Mapping[str, np.ndarray]) -> list:
        """Per image ``(boxes[K, 4], scores[K], classes[K])``."""
        boxes = np.asarray(outputs[self.boxes], np.float64)
        scores = np.asarray(outputs[self.scores], np.float64)
        if boxes.ndim == 2:
            boxes, scores = boxes[None], scores.reshape(1, -1)
        classes = (np.zeros(scores.shape, np.int64) if self.classes is None
                   else np.asarray(outputs[self.classes]).reshape(scores.shape).astype(np.int64))
        images = []
        for b, s, c in zip(boxes, scores.reshape(boxes.shape[0], -1),
                           classes.reshape(boxes.shape[0], -1), strict=True):
            keep = s >= self.min_score
            images.append((b.reshape(-1, 4)[keep], s[keep], c[keep]))
        return images


class YoloDecoder:
    """The built-in decoder of a YOLO-style ``[N, 4 + C, A]`` or ``[N, A, 4 + C]`` output.

    The axis of size ``4 + C`` is the smaller non-batch axis. Per anchor: the best class and
    its score; anchors with score ``>= score_threshold`` are kept, boxes converted to xyxy
    (from ``cx, cy, w, h`` unless ``box_format="xyxy"``), then greedy NMS per class at IoU
    ``nms_iou`` (the highest score first, dropping boxes that overlap a kept one more).
    With ``objectness`` the layout is YOLOv5/v7/YOLOX's ``4 + 1 + C``: each class's score
    is the objectness times the class's own (not the objectness read as a class).
    """

    def __init__(self, output: str, box_format: str = "cxcywh", score_threshold: float = 0.25,
                 nms_iou: float = 0.7, objectness: bool = False):
        self.output, self.box_format = output, box_format
        self.score_threshold, self.nms_iou = score_threshold, nms_iou
        self.objectness = objectness

    def __call__(self, outputs: Mapping[str, np.ndarray]) -> list:
        """Per image ``(boxes[K, 4], scores[K], classes[K])``.

        The last decoding is remembered for the same values (the float outputs of a batch
        are decoded once for every candidate judged against them).
        """
        raw = np.asarray(outputs[self.output])
        config = (self.box_format, self.score_threshold, self.nms_iou, self.objectness)
        recent = YoloDecoder._recent
        for index, entry in enumerate(recent):
            if (entry[0] == config and entry[1].dtype == raw.dtype
                    and entry[1].shape == raw.shape and np.array_equal(entry[1], raw)):
                recent.append(recent.pop(index))
                return [tuple(a.copy() for a in image) for image in entry[2]]
        images = self._decode(raw)
        recent.append((config, raw.copy(), [tuple(a.copy() for a in i) for i in images]))
        del recent[:-2]  # the float outputs and one candidate's
        return images

    #: ``(config, values, images)`` of the last two decodings, the latest last.
    _recent: list = []

    def _decode(self, raw: np.ndarray) -> list:
        value = np.asarray(raw, np.float64)
        if value.ndim != 3 or min(value.shape[1:]) < 5:
            raise TaskError(f"--task detect: output {self.output!r} has shape "
                            f"{list(value.shape)}, not [N, 4+C, A] or [N, A, 4+C]",
                            "give --task-decoder FILE.py for other layouts")
        if value.shape[1] > value.shape[2]:
            value = value.transpose(0, 2, 1)  # [N, A, 4+C] -> [N, 4+C, A]
        images = []
        for image in value:
            boxes, scores = image[:4].T, image[4:]
            if self.objectness:
                scores = scores[1:] * scores[:1]
            classes = np.argmax(scores, axis=0)
            best = scores[classes, np.arange(scores.shape[1])]
            keep = best >= self.score_threshold
            boxes, best, classes = boxes[keep], best[keep], classes[keep]
            if self.box_format == "cxcywh":
                half = boxes[:, 2:] / 2
                boxes = np.concatenate([boxes[:, :2] - half, boxes[:, :2] + half], axis=1)
            kept = nms(boxes, best, classes, self.nms_iou)
            images.append((boxes[kept], best[kept], classes[kept].astype(np.int64)))
        return images


#: Values per block of an IoU matrix (float64 temporaries of a few MB).
_IOU_BLOCK = 1 << 18


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy per-class NMS, highest score first.

    A box is kept when its IoU with every kept box of its class, all of higher score, is at
    most ``iou``. Per class, the boxes not yet decided are kept compacted, best first: the
    first is kept and suppresses the rest in one vectorised step (the IoU of
    :func:`box_iou`, same values, with the areas computed once), which leave the arrays (a
    detector head with thousands of candidates took seconds per image box by box), with the
    same result as comparing box by box.
    """
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    ranked_classes = classes[order]
    for cls in np.unique(ranked_classes):
        index = order[ranked_classes == cls]  # this class's boxes, best first
        if index.size <= _NMS_MATRIX_BOXES:
            kept.extend(_nms_by_matrix(np.asarray(boxes[index], np.float64), index, iou))
            continue
        x0, y0, x1, y1 = np.asarray(boxes[index], np.float64).T
        state = np.stack([x0, y0, x1, y1, (x1 - x0) * (y1 - y0)])  # coordinates, area
        while index.size:
            kept.append(int(index[0]))
            head, rest = state[:, 0], state[:, 1:]
            # box_iou's operations in its order, on buffers (np.clip's wrapper cost more)
            w = np.minimum(head[2], rest[2])
            w -= np.maximum(head[0], rest[0])
            np.maximum(w, 0, out=w)
            h = np.minimum(head[3], rest[3])
            h -= np.maximum(head[1], rest[1])
            np.maximum(h, 0, out=h)
            w *= h  # the intersection
            union = head[4] + rest[4]
            union -= w
            union += 1e-9
            np.divide(w, union, out=w)
            survive = np.flatnonzero(np.logical_not(w > iou))
            index, state = index[survive + 1], rest[:, survive]
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return np.asarray(sorted(kept, key=lambda k: rank[k]), np.int64)


#: Up to this many boxes of a class, NMS reads one IoU matrix (float64, at most 18 MB).
_NMS_MATRIX_BOXES = 1500


def _nms_by_matrix(ranked: np.ndarray, index: np.ndarray, iou: float) -> list[int]:
    """Greedy NMS of one class's boxes ``ranked`` (best first) from their IoU matrix.

    Row ``i`` of :func:`pairwise_iou` is ``box_iou`` of box ``i`` (same values): a box is
    kept unless a kept box above it overlaps it by more than ``iou``, one vector OR per kept
    box instead of a dozen vector operations (the detector's check spent 1.3 s in NMS).
    """
    over = pairwise_iou(ranked, ranked) > iou
    suppressed = np.zeros(len(ranked), bool)
    kept = []
    for i in range(len(ranked)):
        if not suppressed[i]:
            kept.append(int(index[i]))
            suppressed |= over[i]
    return kept


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each of ``boxes`` ``[M, 4]`` (union + 1e-9 as denominator)."""
    w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = w * h
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter + 1e-9)  # 0 for boxes of no area


def pairwise_iou(rows: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """``[R, M]``: row ``r`` is ``box_iou(rows[r], boxes)``.

    The same values: the same operations element by element, broadcast.
    """
    a, b = rows[:, None, :], boxes[None, :, :]
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = w * h
    area = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    areas = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area + areas - inter + 1e-9)


def average_precision(scores: Sequence[float], hits: Sequence[bool], positives: int) -> float:
    """VOC all-point interpolated AP of detections (any order) against ``positives`` boxes."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    tp = np.asarray(hits, np.float64)[order]
    ctp = np.cumsum(tp)
    recall = ctp / max(positives, 1)
    precision = ctp / np.arange(1, len(tp) + 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


@dataclass
class _ClassHits:
    scores: list[float] = field(default_factory=list)
    hits: list[bool] = field(default_factory=list)
    positives: int = 0


class DetectMetric:
    """mAP@0.5 of the quantized model's detections against the float model's."""

    def __init__(self, decode: Callable[[dict[str, np.ndarray]], list], iou: float = 0.5,
                 source: str = ""):
        self.decode = decode
        self.iou = iou
        self.source = source  # what decoded the outputs, for the report
        self.classes: dict[int, _ClassHits] = {}
        self.images = 0
        self.float_detections = 0
        self.quant_detections = 0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["decode"] = None  # a recipe function may not pickle; counts are what merge
        return state

    def update(self, float_outputs: Mapping[str, np.ndarray],
               quant_outputs: Mapping[str, np.ndarray], labels: np.ndarray | None,
               rows: int | None = None) -> None:
        """Decode one batch of both models and match the detections image by image.

        ``labels`` and ``rows`` are unused: the float detections are the ground truth.
        """
        reference = self._decoded(float_outputs)
        detections = self._decoded(quant_outputs)
        if len(reference) != len(detections):
            raise TaskError(f"the decoder gave {len(reference)} images for the float outputs "
                            f"and {len(detections)} for the quantized ones",
                            "return one (boxes, scores, classes) per image")
        for (ref_boxes, _, ref_classes), (boxes, scores, classes) in zip(
                reference, detections, strict=True):
            self.images += 1
            self.float_detections += len(ref_boxes)
            self.quant_detections += len(boxes)
            for cls in sorted(set(ref_classes.tolist()) | set(classes.tolist())):
                self._match(ref_boxes[ref_classes == cls], boxes[classes == cls],
                            scores[classes == cls], self.classes.setdefault(cls, _ClassHits()))

    def _match(self, truth: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
               acc: _ClassHits) -> None:
        acc.positives += len(truth)
        used = np.zeros(len(truth), bool)
        order = np.argsort(-scores, kind="stable")
        if not len(truth) or not len(order):
            acc.scores += [float(scores[k]) for k in order]
            acc.hits += [False] * len(order)
            return
        # each detection's best truth box, all at once (the same IoU values as box by box)
        bests, overlaps = [], []
        step = max(1, _IOU_BLOCK // len(truth))
        for start in range(0, len(order), step):
            overlap = pairwise_iou(boxes[order[start:start + step]], truth)
            best = np.argmax(overlap, axis=1)
            bests.append(best)
            overlaps.append(overlap[np.arange(len(best)), best])
        best_of = np.concatenate(bests).tolist()
        enough = (np.concatenate(overlaps) >= self.iou).tolist()
        for k, best, hit in zip(order.tolist(), best_of, enough, strict=True):
            hit = hit and not used[best]
            if hit:
                used[best] = True
            acc.scores.append(float(scores[k]))
            acc.hits.append(hit)

    def _decoded(self, outputs: Mapping[str, np.ndarray]) -> list:
        images = self.decode(dict(outputs))
        checked = []
        for index, item in enumerate(images):
            try:
                boxes, scores, *rest = item
                boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
                scores = np.asarray(scores, np.float64).reshape(-1)
                classes = (np.asarray(rest[0]).reshape(-1).astype(np.int64) if rest
                           else np.zeros(len(scores), np.int64))
            except (TypeError, ValueError) as exc:
                raise TaskError(f"the decoder's image {index} is not (boxes[K, 4], scores[K], "
                                f"classes[K]): {exc}", "return one such tuple per image") from exc
            if not len(boxes) == len(scores) == len(classes):
                raise TaskError(f"the decoder's image {index} has {len(boxes)} boxes, "
                                f"{len(scores)} scores and {len(classes)} classes",
                                "return as many of each")
            checked.append((boxes, scores, classes))
        return checked

    def merge(self, other: DetectMetric) -> None:
        """Add another shard's matches (merge shards in data order)."""
        for cls, acc in other.classes.items():
            mine = self.classes.setdefault(cls, _ClassHits())
            mine.scores += acc.scores
            mine.hits += acc.hits
            mine.positives += acc.positives
        self.images += other.images
        self.float_detections += other.float_detections
        self.quant_detections += other.quant_detections

    def result(self) -> TaskResult:
        """The mAP against the float detections (None when float detects nothing)."""
        aps = [average_precision(acc.scores, acc.hits, acc.positives)
               for _, acc in sorted(self.classes.items()) if acc.positives]
        value = float(np.mean(aps)) if aps else None
        metrics: dict[str, float | int | None] = {
            "map50": value, "float_detections": self.float_detections,
            "quant_detections": self.quant_detections}
        drop = None if value is None else 100.0 * (1 - value)
        return TaskResult("detect", self.source, metrics, drop,
                          f"mAP@{self.iou:g} against the float model's detections")


# -- auto ----------------------------------------------------------------------------------


def recognize(outputs: Mapping[str, np.ndarray]) -> Task | None:
    """The task a model's float outputs look like (see the module docstring), or None.

    Looked for in this order over the outputs: a YOLO-style output, per-step
    log-probabilities or probabilities (rank 3), classifier logits ``[N, classes]``.
    """
    for name, value in outputs.items():
        if _looks_yolo(np.asarray(value)):
            return Task("detect", (("output", name),))
    for name, value in outputs.items():
        value = np.asarray(value)
        if value.ndim == 3 and value.shape[-1] > 1 and _is_distribution(value):
            return Task("ctc", (("output", name),))
    for name, value in outputs.items():
        value = np.asarray(value)
        if (value.ndim == 2 and value.shape[1] > 1 and np.issubdtype(value.dtype, np.floating)
                and not _unit_rows(value)):
            return Task("classify", (("output", name),))
    return None


def _unit_rows(value: np.ndarray) -> bool:
    """Rows of L2 norm 1: an embedding (a sentence or face vector), whose argmax means nothing."""
    norms = np.linalg.norm(np.asarray(value, np.float64), axis=-1)
    return bool(norms.size and np.all(np.abs(norms - 1.0) < 1e-3))


#: Share of box values that may be negative in decoded pixel boxes (xyxy corners just past
#: the image border); a raw head's grid offsets are negative more often.
DECODED_NEGATIVE_SHARE = 0.05
#: The largest box coordinate of decoded pixel boxes is at least this (half of the smallest
#: input a detector takes); a raw head's grid offsets and log sizes stay within a few units.
DECODED_MIN_EXTENT = 16.0


def _looks_yolo(value: np.ndarray) -> bool:
    """``[N, 4 + C, A]`` / ``[N, A, 4 + C]``: scores in [0, 1], boxes decoded, in pixels.

    Decoded means coordinates of pixels (the largest at least :data:`DECODED_MIN_EXTENT`)
    and almost none negative: a head exported without its decoding (YOLOX's
    ``decode_in_inference=False``: grid offsets and log sizes, all within -2..5) would be read
    as boxes by the built-in decoder and its metric would judge noise (ddddocr's YOLOX
    detector: 360 "detections" an image).
    """
    if value.ndim != 3 or not np.issubdtype(value.dtype, np.floating) or value.size == 0:
        return False
    small, large = sorted(value.shape[1:])
    if small < 5 or large <= small:
        return False
    if value.shape[1] > value.shape[2]:
        value = value.transpose(0, 2, 1)
    boxes, scores = value[:, :4], value[:, 4:]
    return bool(scores.min() >= 0.0 and scores.max() <= 1.0
                and boxes.max() >= DECODED_MIN_EXTENT
                and np.mean(boxes < 0.0) <= DECODED_NEGATIVE_SHARE)


def _is_distribution(value: np.ndarray) -> bool:
    """Log-probabilities (logsumexp 0) or probabilities (sum 1) over the last axis."""
    if not np.issubdtype(value.dtype, np.floating) or value.size == 0:
        return False
    x = np.asarray(value, np.float64)
    if x.max() <= 1e-4:
        top = x.max(axis=-1, keepdims=True)
        total = np.log(np.sum(np.exp(x - top), axis=-1)) + top[..., 0]
        return bool(np.all(np.abs(total) < 1e-3))
    if x.min() >= 0.0:
        return bool(np.all(np.abs(x.sum(axis=-1) - 1.0) < 1e-3))
    return False


class AutoMetric:
    """The metric of the task :func:`recognize` finds on the first batch (or none)."""

    def __init__(self) -> None:
        self.inner: ClassifyMetric | CTCMetric | DetectMetric | None = None
        self.decided = False

    def update(self, float_outputs: Mapping[str, np.ndarray],
               quant_outputs: Mapping[str, np.ndarray], labels: np.ndarray | None,
               rows: int | None = None) -> None:
        """Recognize the task on the first batch, then update its metric."""
        if not self.decided:
            self.decided = True
            task = recognize(float_outputs)
            self.inner = task.metric() if task is not None else None
        if self.inner is not None:
            self.inner.update(float_outputs, quant_outputs, labels, rows)

    def merge(self, other: AutoMetric) -> None:
        """Add another shard's metric (the same task is recognised on every shard)."""
        if other.inner is None:
            return
        if self.inner is None:
            self.inner, self.decided = other.inner, True
        else:
            self.inner.merge(other.inner)

    def result(self) -> TaskResult | None:
        """The recognised task's result, marked as recognised; None without one."""
        if self.inner is None:
            return None
        result = self.inner.result()
        result.recognized = True
        return result


def _first(outputs: Mapping[str, np.ndarray], fits: Callable[[np.ndarray], bool], task: str,
           what: str) -> str:
    for name, value in outputs.items():
        if fits(value):
            return name
    raise TaskError(f"--task {task}: no output is {what} (outputs: "
                    f"{', '.join(f'{n} {list(v.shape)}' for n, v in outputs.items())})",
                    "name it with --task-option output=NAME")


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def task_summary(task: Mapping[str, Any]) -> str:
    """One line of a task result (a :class:`TaskResult` as a dict), for reports."""
    metrics = task["metrics"]
    parts = []
    for key, label in (("top1_agreement", "top-1 agreement"), ("cer", "CER vs float"),
                       ("line_accuracy", "line accuracy vs float"),
                       ("step_agreement", "per-step top-1 agreement"),
                       ("map50", "mAP@0.5 vs float")):
        if metrics.get(key) is not None:
            parts.append(f"{label} {_pct(metrics[key])}")
    pairs = (("float_accuracy", "quant_accuracy", "top-1 accuracy"),
             ("float_cer", "quant_cer", "CER"),
             ("float_line_accuracy", "quant_line_accuracy", "line accuracy"))
    for f, q, label in pairs:
        if metrics.get(f) is not None and metrics.get(q) is not None:
            parts.append(f"{label} float {_pct(metrics[f])} quantized {_pct(metrics[q])}")
    if "float_detections" in metrics:
        parts.append(f"detections float {metrics['float_detections']} quantized "
                     f"{metrics['quant_detections']}")
    where = f" ({task['output']})" if task.get("output") else ""
    drop = task.get("drop")
    lost = "" if drop is None or (isinstance(drop, float) and math.isnan(drop)) else (
        f"; drop {drop:.2f} pts ({task['judged_by']})")
    how = " (recognised from the outputs; --task none turns it off)" if task.get(
        "recognized") else ""
    return f"task {task['task']}{where}{how}: " + ", ".join(parts) + lost


def _pct(value: float) -> str:
    return f"{100.0 * value:.2f}%"
