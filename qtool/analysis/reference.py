r"""The float model's outputs on a bounded slice of the judging data, computed once.

The float fallback, the layer sensitivity and the final comparison each judge candidate
quantized models against the float model on the same data. Re-running the float model for
every candidate doubles the work of every candidate for nothing: :class:`FloatReference`
runs it once over at most ``max_samples`` rows (whole batches), keeps each batch's feeds,
labels and float outputs, and :meth:`FloatReference.evaluate` then runs only the
candidate's own session. The metrics are those of :func:`qtool.analysis.evaluate.evaluate`
on the same rows (the same running sums):

    SQNR (dB) = 10 * log10( sum(x^2) / sum((x - q)^2) ),  top-1 agreement, accuracy

and, with a task (:mod:`qtool.analysis.tasks`), the task's metric.

Memory: the slice's inputs and model outputs (bounded by ``max_samples``), not the
intermediate tensors. Every evaluation is counted in :attr:`FloatReference.candidates`, so
a search can report what it cost.
"""

from __future__ import annotations

import logging
import time

from qtool.analysis.common import Batches, iterate_batches, session
from qtool.analysis.evaluate import (
    Evaluation,
    _ErrorSums,
    _feeds,
    _input_specs,
    _is_classifier,
    output_metrics,
    output_ranks,
)
from qtool.analysis.tasks import Task, Top1Counts, resolve_task
from qtool.errors import DataError
from qtool.io import load_model, serialize

log = logging.getLogger(__name__)

#: Rows a search judges its candidates on, by default (whole batches, at least one).
DEFAULT_SAMPLES = 128


class FloatReference:
    """Float outputs of a slice of the data, to judge many candidate models against.

    Args:
        float_graph: The prepared float model (Graph, ModelProto, path or bytes).
        batches: Data batches (labels optional), or a callable returning them.
        max_samples: Keep whole batches until this many rows (None: all the data).
        task: A task (name or :class:`~qtool.analysis.tasks.Task`) whose metric every
            evaluation adds, or None.

    Attributes:
        samples: Rows kept.
        labelled: Whether the data has labels.
        candidates: Models evaluated so far.
        seconds: Wall time spent (float run and evaluations).
    """

    def __init__(self, float_graph, batches: Batches, *, max_samples: int | None = None,
                 task: str | Task | None = None):
        start = time.perf_counter()
        proto = load_model(float_graph)
        self.output_names = [o.name for o in proto.graph.output]
        self.task = resolve_task(task)
        if self.task is not None:
            self.task.check_outputs(output_ranks(proto))
        self._specs = _input_specs(proto)
        float_session = session(serialize(proto))
        del proto
        self._batches: list[tuple[dict, object, list]] = []
        self.samples = 0
        self.labelled = False
        for index, batch in enumerate(iterate_batches(batches)):
            feeds, labels = _feeds(batch, self._specs, index)
            rows = int(next(iter(feeds.values())).shape[0])
            if labels is not None and labels.shape[0] != rows:
                raise DataError(
                    f"batch {index}: {labels.shape[0]} labels for {rows} inputs",
                    "give one label per sample under the 'labels' key",
                )
            outputs = _run(float_session, self.output_names, feeds, index)
            self._batches.append((feeds, labels, outputs))
            self.samples += rows
            self.labelled = self.labelled or labels is not None
            if max_samples is not None and self.samples >= max_samples:
                break
        if self.samples == 0:
            raise DataError("the evaluation data is empty", "give at least one sample")
        self.candidates = 0
        self.seconds = time.perf_counter() - start

    def evaluate(self, quant_model) -> Evaluation:
        """Compare a candidate quantized model with the kept float outputs.

        Args:
            quant_model: The candidate (Graph, ModelProto, path or bytes) with the float
                model's inputs and outputs.

        Returns:
            The :class:`Evaluation` on the kept rows (no layerwise metrics).
        """
        start = time.perf_counter()
        candidate = session(serialize(load_model(quant_model)))
        sums = {name: _ErrorSums() for name in self.output_names}
        classifiers: dict[str, Top1Counts] = {}
        metric = self.task.metric() if self.task is not None else None
        for index, (feeds, labels, outputs) in enumerate(self._batches):
            values = _run(candidate, self.output_names, feeds, index)
            if metric is not None:
                metric.update(dict(zip(self.output_names, outputs, strict=True)),
                              dict(zip(self.output_names, values, strict=True)), labels,
                              int(next(iter(feeds.values())).shape[0]))
            for name, x, q in zip(self.output_names, outputs, values, strict=True):
                if x.shape != q.shape:
                    raise DataError(f"output {name}: float shape {x.shape}, quantized {q.shape}")
                sums[name].update(x, q)
                if _is_classifier(x):
                    classifiers.setdefault(name, Top1Counts()).update(x, q, labels)
        self.candidates += 1
        self.seconds += time.perf_counter() - start
        return Evaluation(self.samples, output_metrics(self.output_names, sums, classifiers,
                                                       self.labelled), [], self.labelled,
                          metric.result() if metric is not None else None)

    def cost(self) -> dict[str, int]:
        """What judging cost, in deterministic units: candidates and rows per candidate."""
        return {"candidates": self.candidates, "samples": self.samples}


def _run(model_session, names, feeds, index):
    try:
        return model_session.run(names, feeds)
    except Exception as exc:  # onnxruntime raises its own exception types
        text = str(exc).strip()
        raise DataError(
            f"batch {index}: onnxruntime cannot run the models on it: "
            f"{text.splitlines()[0] if text else type(exc).__name__}",
            "check that the data fits the model's inputs (a dynamic dim may accept only "
            "some sizes)",
        ) from exc
