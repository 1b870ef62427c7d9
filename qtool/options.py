"""The options of the main job (``qtool calibrate``), below every module that reads them.

:class:`CalibrateOptions` is what the CLI flags, a calibrate config file
(:mod:`qtool.calibrate_config`) and the report all speak of; it lives here, on a floor of
its own, so that the job (:mod:`qtool.workflow`), the config reader and the report can each
import it without importing one another.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: ``--method auto``: the least-error observer per tensor (:mod:`qtool.analysis.autoselect`).
AUTO_METHOD = "auto"
#: ``--analysis`` levels: nothing after quantizing, the output comparison, or also the
#: accumulated error of every quantized tensor with histograms.
ANALYSIS_LEVELS = ("none", "summary", "full")
#: Other tools' names of observers, accepted as ``--method`` (onnxruntime's, ModelOpt's).
METHOD_ALIASES = {"entropy": "kld", "percentile": "quantile"}


@dataclass(frozen=True)
class CalibrateOptions:
    """Options of :func:`quantize_model` (the ``qtool calibrate`` flags).

    Attributes:
        data: Calibration data (folder, .npz, .npy); None: random inputs, marked unfit.
        eval_data: Held-out data to evaluate on; None: the calibration data.
        method: Observer name for activation ranges, or ``auto`` (the least-error
            observer per tensor, :mod:`qtool.analysis.autoselect`).
        weight_method: Observer name for weight ranges.
        num_samples: At most this many samples (calibration and evaluation each).
        batch_size: Samples per onnxruntime run.
        weight_bits: Override the backend's weight bits.
        act_bits: Override the backend's activation bits.
        skip: Node names, op types or regexes to keep float.
        plan: A saved plan JSON to use instead of building one.
        workers: Processes that calibrate shards of the data and run the analyses' tasks
            (sensitivity, fallback, ``--method auto``, AdaRound).
        seed: Seed of random inputs.
        layerwise: Add per-tensor SQNR to the report.
        progress: Show a progress bar (None: when stderr is a terminal).
        sensitivity: Measure each layer quantized alone (one pass over the data per layer).
        target_sqnr: Keep the most sensitive layers float until the output SQNR (dB, on the
            calibration data) reaches this.
        max_accuracy_drop: Keep the most sensitive layers float until the top-1 accuracy on
            the (labelled) evaluation data is at most this many points below float; with a
            ``task``, until the task's drop is at most this (:mod:`qtool.analysis.tasks`).
        task: ``classify``, ``ctc`` or ``detect`` (or a :class:`qtool.analysis.tasks.Task`):
            its metric is reported beside the SQNR and judges ``max_accuracy_drop`` and the
            sensitivity ranking; None: top-1 of rank-2 outputs, as always.
        task_options: The task's ``KEY=VALUE`` options (``--task-option``) or a mapping.
        task_decoder: ``--task detect``: the decoder recipe, ``FILE.py[:FUNCTION]``.
        preprocess: Image-folder preprocessing (:class:`qtool.calibration.images.
            Preprocessing` or a dict of its keys); None: the defaults for the model.
        providers: onnxruntime execution providers of every session, in order (names or
            ``"cuda,cpu"``); None: the CPU.
        backend_options: The backend's options, ``{"reduce_range": False}`` or
            ``("reduce_range=false", ...)`` (``--backend-option``); unknown keys are an error.
        target_cpu: The CPU the model is made for (``--target-cpu``: ``auto``, ``vnni``,
            ``avx2``, ``arm``; :mod:`qtool.cpu`): the onnxruntime backend's weight width and
            the kernel check's overflow warning follow it; ``auto`` reads this CPU.
        kernel_check: Also run the QDQ model in onnxruntime's integer kernels (default
            optimizations) on a few evaluation samples and report how far they are from the
            simulation (:mod:`qtool.analysis.kernels`); not with ``analysis="none"``.
        adaround: Learn the rounding of the Conv/Gemm weights on the calibration data
            (AdaRound, :mod:`qtool.qat.adaround`; needs ``qtool[qat]``).
        adaround_iters: AdaRound's optimisation steps per layer.
        cle: Cross-layer equalization before planning (:mod:`qtool.passes.cle`), with
            high-bias absorption measured on the calibration data. None (the default): on
            for backends with per-tensor weights (academic, tvm, snpe), where evening the
            channels' weight ranges pays, off for per-channel ones, where it only moves
            activation ranges (silero-vad: snpe +4.8 dB, tvm +7.6 dB, tensorrt -8.3 dB).
        bias_correction: Correct each quantized layer's bias for the mean error it adds on
            the calibration data (:mod:`qtool.bias_correction`): ``exact`` (True), ``fast``
            or ``off`` (False).
        fail_under_sqnr: SQNR floor (dB) of every output on the evaluation data; below it
            the report warns (at 10 dB when None) and the CLI exits 1.
        input_axes: ``(input, axis)`` pairs declaring an input's batch axis (None: the input
            is not a batch, its value goes with every sample); others are inferred.
        analysis: ``none``, ``summary`` (outputs compared on the evaluation data) or
            ``full`` (also the accumulated error of every quantized tensor, histograms).
        memory_budget: Bytes of observed tensors per onnxruntime run of the calibration;
            bigger batches run as micro-batches (None: whole batches).
        executor: Where ``workers > 1`` calibrate their shards: ``local`` processes or
            ``ray`` (:mod:`qtool.executor`; the cluster ``RAY_ADDRESS`` names, else a local
            Ray). The output is the same, byte for byte.
        config: The calibrate config file these options came from
            (:func:`calibrate_options_from_recipe`); the report names it.
        requantize: Accept a model that already holds Q/DQ pairs: strip them back to float
            first (:mod:`qtool.passes.strip_qdq`); without it such a model is refused.
        smoothquant: SmoothQuant (:mod:`qtool.smoothing`): an alpha in [0, 1], ``search``
            (alpha judged on the judging data), ``off``, or None: on by default where
            transformer blocks read activations with outlier channels.
    """

    data: str | os.PathLike | None = None
    eval_data: str | os.PathLike | None = None
    method: str = "minmax"
    weight_method: str = "minmax"
    num_samples: int | None = None
    batch_size: int = 32
    weight_bits: int | None = None
    act_bits: int | None = None
    skip: tuple[str, ...] = ()
    plan: str | os.PathLike | None = None
    workers: int = 1
    seed: int = 0
    layerwise: bool = False
    progress: bool | None = False
    sensitivity: bool = False
    target_sqnr: float | None = None
    max_accuracy_drop: float | None = None
    task: Any = None
    task_options: Mapping[str, Any] | tuple[str, ...] = ()
    task_decoder: str | None = None
    preprocess: Any = None
    providers: str | tuple[str, ...] | None = None
    backend_options: Mapping[str, Any] | tuple[str, ...] = ()
    target_cpu: str = "auto"
    kernel_check: bool = True
    adaround: bool = False
    adaround_iters: int = 200
    cle: bool | None = None
    bias_correction: bool | str = True
    fail_under_sqnr: float | None = None
    input_axes: tuple[tuple[str, int | None], ...] = ()
    analysis: str = "summary"
    memory_budget: int | None = 64 * 2**20
    executor: str = "local"
    config: str | os.PathLike | None = None
    requantize: bool = False
    smoothquant: float | str | None = None
