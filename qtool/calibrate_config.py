"""A calibrate config: ``qtool calibrate --config FILE`` reads the run's options from a file.

The file (YAML or JSON, read by :func:`qtool.pipeline.load_recipe`) is a mapping whose keys
are the ``qtool calibrate`` options, named as :class:`qtool.options.CalibrateOptions`
names them::

    model: digits_cnn.onnx          # paths are relative to the file's folder
    backend: tensorrt
    data: digits_calib.npz
    method: mse
    cle: true
    bias_correction: false
    adaround: {iterations: 50}

:data:`KEYS` is the one table from a key to the options it sets: each entry reads and
checks the value (wrong type, bad value: one :class:`~qtool.errors.RecipeError` naming the
key and what it takes) and returns ``CalibrateOptions`` fields. An unknown key is an error
that lists the valid ones. On the command line, a flag given explicitly wins over the file
(:meth:`CalibrateConfig.options`); ``--backend-option``, ``--input-axis`` and the image
flags win key by key, the file's other keys stay.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from qtool.errors import DataError, RecipeError

#: The config keys that are not options: the model, the output and the backend.
RUN_KEYS = ("model", "output", "backend")
#: Options that change how a run goes, not what it writes: left out of the report.
RUN_ONLY_FIELDS = frozenset({"workers", "executor", "memory_budget", "progress", "config"})
#: The ``adaround`` mapping's keys and the option each sets.
ADAROUND_KEYS = {"enabled": "adaround", "iterations": "adaround_iters"}
MB = 2**20


class _Bad(Exception):
    """A value a key does not take; ``valid`` says what it takes."""

    def __init__(self, valid: str, problem: str | None = None):
        super().__init__(valid)
        self.valid = valid
        self.problem = problem


Reader = Callable[[Any, Path | None], Any]


def _integer(low: int | None = None, high: int | None = None) -> Reader:
    what = ("an integer" + (f" >= {low}" if low is not None and high is None else "")
            + (f" from {low} to {high}" if high is not None else ""))

    def read(value, _base):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(what)
        if (low is not None and value < low) or (high is not None and value > high):
            raise _Bad(what)
        return value

    return read


def _number(low: float | None = None) -> Reader:
    what = "a number" + (f" >= {low:g}" if low is not None else "")

    def read(value, _base):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Bad(what)
        if low is not None and value < low:
            raise _Bad(what)
        return float(value)

    return read


def _boolean(value, _base):
    if not isinstance(value, bool):
        raise _Bad("true or false")
    return value


def _bias_correction(value, _base):
    from qtool.bias_correction import MODES

    if isinstance(value, bool) or value in MODES:
        return value
    raise _Bad(f"true, false or one of {', '.join(MODES)}")


def _choice(names: Callable[[], Collection[str]], aliases: Mapping[str, str] | None = None
            ) -> Reader:
    def read(value, _base):
        valid = [*names(), *(aliases or {})]
        if not isinstance(value, str) or value not in valid:
            raise _Bad(f"one of: {', '.join(valid)}")
        return (aliases or {}).get(value, value)

    return read


def _path(exists: bool) -> Reader:
    def read(value, base):
        if not isinstance(value, str) or not value:
            raise _Bad("a path (relative to the config's folder)")
        path = os.path.normpath(value if base is None else base / value)
        if exists and not os.path.exists(path):
            raise _Bad("an existing file or folder (paths are relative to the config's "
                        "folder)", f"no such file or folder {Path(path).as_posix()}")
        return path

    return read


def _names(value, _base) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
        raise _Bad("a name or a list of names")
    return tuple(items)


def _scalar_mapping(value, _base) -> dict[str, Any]:
    """``{key: value}``, or a list of ``KEY=VALUE`` texts as ``--backend-option`` takes."""
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        return dict(item.split("=", 1) for item in value)
    if not isinstance(value, Mapping) or not all(
        isinstance(v, str | int | float | bool) for v in value.values()
    ):
        raise _Bad("a mapping of option: value (or a list of KEY=VALUE)")
    return {str(k): v for k, v in value.items()}


def _axes(value, _base) -> tuple[tuple[str, int | None], ...]:
    if not isinstance(value, Mapping) or not all(
        v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
        for v in value.values()
    ):
        raise _Bad("a mapping of input name: axis (an integer >= 0, or null)")
    return tuple((str(k), v) for k, v in value.items())


def _preprocess(value, base):
    """A mapping of the preprocessing keys, or a preprocessing file (as ``--preprocess``)."""
    from qtool.calibration.images import PREPROCESS_KEYS, Preprocessing

    valid = f"a mapping of {', '.join(PREPROCESS_KEYS)}, or a file with them"
    source = "key 'preprocess'"
    if isinstance(value, str):
        from qtool.pipeline import load_recipe

        path = _path(exists=True)(value, base)
        source = path
        value = load_recipe(path)
        value = value.get("preprocess", value)
    if not isinstance(value, Mapping):
        raise _Bad(valid)
    try:
        return Preprocessing.from_mapping(value, source)
    except DataError as exc:
        raise _Bad(valid, exc.message) from exc


def _smoothquant(value, _base):
    """An alpha in [0, 1], ``search`` or ``off`` (as ``--smoothquant``)."""
    if isinstance(value, bool) or not (isinstance(value, int | float) and 0 <= value <= 1
                                       or value in ("search", "off")):
        raise _Bad("an alpha from 0 to 1, 'search' or 'off'")
    return value if isinstance(value, str) else float(value)


def _adaround(value, _base) -> dict[str, Any]:
    """``true``/``false``, or a mapping of :data:`ADAROUND_KEYS` (enabled unless it says no)."""
    if isinstance(value, bool):
        return {"adaround": value}
    valid = f"true, false or a mapping of {', '.join(ADAROUND_KEYS)}"
    if not isinstance(value, Mapping):
        raise _Bad(valid)
    unknown = sorted(set(value) - set(ADAROUND_KEYS))
    if unknown:
        raise _Bad(valid, f"unknown key(s) {', '.join(map(str, unknown))}")
    readers = {"enabled": _boolean, "iterations": _integer(1)}
    values = {"adaround": True}
    for key, item in value.items():
        try:
            values[ADAROUND_KEYS[key]] = readers[key](item, None)
        except _Bad as exc:
            raise _Bad(f"{key}: {exc.valid}", f"adaround.{key} is {item!r}") from exc
    return values


def _method_aliases() -> Mapping[str, str]:
    from qtool.options import METHOD_ALIASES  # onnxruntime's and ModelOpt's names, as the flag

    return METHOD_ALIASES


def _observer_names(auto: bool) -> Callable[[], list[str]]:
    def names():
        from qtool.calibration.observers import OBSERVERS
        from qtool.options import AUTO_METHOD

        return [*OBSERVERS, *([AUTO_METHOD] if auto else [])]

    return names


def _cpu_targets():
    from qtool.cpu import TARGETS

    return TARGETS


def _cpu_aliases():
    from qtool.cpu import ALIASES

    return ALIASES


def _backend_names():
    from qtool.backends import backend_names

    return list(backend_names())


def _task_names():
    from qtool.analysis.tasks import TASK_NAMES

    return TASK_NAMES


def _executors():
    from qtool.executor import EXECUTORS

    return EXECUTORS


def _analysis_levels():
    from qtool.options import ANALYSIS_LEVELS

    return ANALYSIS_LEVELS


def _method(auto: bool) -> Reader:
    def read(value, base):
        return _choice(_observer_names(auto), _method_aliases())(value, base)

    return read


def _providers(value, _base):
    if isinstance(value, str) and value:
        return value
    return ",".join(_names(value, None))


def _sets(*names: str, read: Reader, convert: Callable[[Any], Any] = lambda v: v):
    """A reader that sets the options ``names`` to the value read."""
    return lambda value, base: dict.fromkeys(names, convert(read(value, base)))


@dataclass(frozen=True)
class Key:
    """One config key: what it sets, from which value.

    Attributes:
        read: ``(value, config folder) -> {option: value}``; raises on a value the key
            does not take.
        help: What the key is, for the docs and the error hints.
    """

    read: Callable[[Any, Path | None], dict[str, Any]]
    help: str


#: Config key -> the options it sets (later keys win: ``weight_bits`` over ``bits``).
KEYS: dict[str, Key] = {
    "model": Key(_sets("model", read=_path(exists=True)), "the float ONNX model"),
    "output": Key(_sets("output", read=_path(exists=False)), "output folder or NAME.onnx"),
    "backend": Key(_sets("backend", read=_choice(_backend_names)), "the engine"),
    "backend_options": Key(_sets("backend_options", read=_scalar_mapping),
                           "the backend's options, {key: value}"),
    "data": Key(_sets("data", read=_path(exists=True)), "calibration data"),
    "eval_data": Key(_sets("eval_data", read=_path(exists=True)), "held-out data"),
    "method": Key(_sets("method", read=_method(auto=True)), "activation observer, or auto"),
    "weight_method": Key(_sets("weight_method", read=_method(auto=False)), "weight observer"),
    "num_samples": Key(_sets("num_samples", read=_integer(1)), "at most this many samples"),
    "batch_size": Key(_sets("batch_size", read=_integer(1)), "samples per onnxruntime run"),
    "input_axes": Key(_sets("input_axes", read=_axes), "{input: batch axis or null}"),
    "bits": Key(_sets("weight_bits", "act_bits", read=_integer(2, 16)),
                "bits of weights and activations"),
    "weight_bits": Key(_sets("weight_bits", read=_integer(2, 16)), "bits of weights"),
    "act_bits": Key(_sets("act_bits", read=_integer(2, 16)), "bits of activations"),
    "skip": Key(_sets("skip", read=_names), "nodes to keep float: names, op types, regexes"),
    "plan": Key(_sets("plan", read=_path(exists=True)), "a saved plan JSON"),
    "workers": Key(_sets("workers", read=_integer(1)), "calibration workers"),
    "executor": Key(_sets("executor", read=_choice(_executors)), "where workers run"),
    "seed": Key(_sets("seed", read=_integer()), "seed of random inputs"),
    "layerwise": Key(_sets("layerwise", read=_boolean), "per-tensor SQNR in the report"),
    "sensitivity": Key(_sets("sensitivity", read=_boolean), "rank layers by sensitivity"),
    "target_sqnr": Key(_sets("target_sqnr", read=_number()), "float fallback to this SQNR"),
    "max_accuracy_drop": Key(_sets("max_accuracy_drop", read=_number(0.0)),
                             "float fallback to this accuracy drop"),
    "task": Key(_sets("task", read=_choice(_task_names)), "classify|ctc|detect metric"),
    "task_options": Key(_sets("task_options", read=_scalar_mapping, convert=lambda m: m or ()),
                        "the task's options, {key: value}"),
    "task_decoder": Key(_sets("task_decoder", read=_path(exists=True)),
                        "detect: FILE.py with decode(outputs)"),
    "fail_under_sqnr": Key(_sets("fail_under_sqnr", read=_number()), "SQNR floor (dB)"),
    "cle": Key(_sets("cle", read=_boolean),
               "cross-layer equalization (null: on for per-tensor-weight backends)"),
    "bias_correction": Key(_sets("bias_correction", read=_bias_correction),
                           "bias correction: true|false|exact|fast|off"),
    "requantize": Key(_sets("requantize", read=_boolean),
                      "strip an input's Q/DQ pairs to float and quantize it again"),
    "smoothquant": Key(_sets("smoothquant", read=_smoothquant),
                       "SmoothQuant alpha, search or off (null: transformer default)"),
    "adaround": Key(_adaround, "learned rounding: true, or {iterations: N}"),
    "analysis": Key(_sets("analysis", read=_choice(_analysis_levels)), "none|summary|full"),
    "kernel_check": Key(_sets("kernel_check", read=_boolean), "onnxruntime kernel check"),
    "target_cpu": Key(_sets("target_cpu", read=_choice(_cpu_targets, _cpu_aliases())),
                      "auto|vnni|avx2|arm: the CPU the model is made for"),
    "memory_budget": Key(_sets("memory_budget", read=_integer(1), convert=lambda mb: mb * MB),
                         "MB of observed tensors per run"),
    "providers": Key(_sets("providers", read=_providers), "onnxruntime execution providers"),
    "preprocess": Key(_sets("preprocess", read=_preprocess), "image preprocessing"),
}

#: ``qtool calibrate`` parameters (click names) that set each option; given explicitly,
#: they win over the file. An option not listed is set by the parameter of its own name.
FLAGS: dict[str, tuple[str, ...]] = {
    "data": ("data_path",),
    "eval_data": ("eval_path",),
    "weight_bits": ("weight_bits", "bits"),
    "act_bits": ("act_bits", "bits"),
    "plan": ("plan_path",),
    "providers": ("provider",),
    "analysis": ("analysis_level",),
    "bias_correction": ("bias_correction", "no_bias_correction"),
    "preprocess": ("preprocess_file", "resize", "crop", "mean", "std", "scale", "layout",
                   "color"),
}


def _merge_pairs(config_value, flag_value):
    """Key by key, the flags' ``KEY=VALUE`` (or ``(key, value)``) over the file's."""
    merged = dict(config_value)
    for item in flag_value:
        key, value = item.split("=", 1) if isinstance(item, str) else item
        merged[key.strip()] = value.strip() if isinstance(value, str) else value
    return merged


#: Options whose flags merge with the file's value instead of replacing it.
MERGES: dict[str, Callable[[Any, Any], Any]] = {
    "backend_options": _merge_pairs,
    "task_options": _merge_pairs,
    "input_axes": lambda config_value, flags: tuple(_merge_pairs(config_value, flags).items()),
    "preprocess": lambda config_value, flags: flags.over(config_value),
}


@dataclass(frozen=True)
class CalibrateConfig:
    """A calibrate config, read and checked.

    Attributes:
        source: The file as given (None: a mapping).
        model: The model path, relative to the current folder (None: not in the config).
        output: The output path, likewise.
        backend: The backend name (None: not in the config).
        values: The :class:`qtool.options.CalibrateOptions` fields the config sets.
    """

    source: str | None = None
    model: str | None = None
    output: str | None = None
    backend: str | None = None
    values: Mapping[str, Any] = field(default_factory=dict)

    def options(self, base: Any = None, given: Collection[str] = ()) -> Any:
        """``base`` options with the config's values, except where a flag in ``given`` set one.

        Args:
            base: The :class:`qtool.options.CalibrateOptions` of the command line (or the
                defaults).
            given: The ``qtool calibrate`` parameters given explicitly (click names).

        Returns:
            The effective ``CalibrateOptions``, naming this config as its source.
        """
        from qtool.options import CalibrateOptions

        base = CalibrateOptions() if base is None else base
        given = set(given)
        effective = {}
        for name, value in self.values.items():
            if not given & set(FLAGS.get(name, (name,))):
                effective[name] = value
            elif name in MERGES:
                effective[name] = MERGES[name](value, getattr(base, name))
        return replace(base, **effective, config=self.source)


def load_calibrate_config(source: str | os.PathLike | Mapping[str, Any]) -> CalibrateConfig:
    """Read a calibrate config from a YAML/JSON file or a mapping.

    Paths in a file are relative to the file's folder; in a mapping, to the current folder.

    Raises:
        RecipeError: The file does not parse, or a key is unknown (the message lists the
            valid ones) or has a value it does not take.
    """
    from qtool.pipeline import load_recipe

    if isinstance(source, Mapping):
        spec, base, name = source, None, "the calibrate config"
    else:
        spec, base, name = load_recipe(source), Path(source).parent, Path(source).as_posix()
    values: dict[str, Any] = {}
    for key, value in spec.items():
        entry = KEYS.get(key) if isinstance(key, str) else None
        if entry is None:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            raise RecipeError(f"{name}: unknown key {key!r}"
                              + (f" (did you mean {close[0]!r}?)" if close else ""),
                              f"valid keys: {', '.join(KEYS)} (docs/cli.md)")
        if value is None and key not in RUN_KEYS:
            continue  # `key:` with nothing: the default
        try:
            values.update(entry.read(value, base))
        except _Bad as exc:
            problem = exc.problem or f"got {value!r}"
            raise RecipeError(f"{name}: key {key!r} takes {exc.valid}; {problem}",
                              f"{key}: {entry.help}") from exc
    run = {k: values.pop(k, None) for k in RUN_KEYS}
    return CalibrateConfig(None if isinstance(source, Mapping) else name,
                           values=dict(sorted(values.items())), **run)


def recipe_options(options: Any) -> dict[str, Any]:
    """The options that shape a run's files, as config keys and plain values (for reports).

    Fed back as a config (with ``backend`` and ``model``), they give the same files.
    Options that only change how the run goes (:data:`RUN_ONLY_FIELDS`) are left out: the
    same files with any number of workers.
    """
    plain: dict[str, Any] = {}
    for item in fields(options):
        name = item.name
        if name in RUN_ONLY_FIELDS or name in ("adaround", "adaround_iters"):
            continue
        plain[name] = _plain(name, getattr(options, name))
    plain["adaround"] = ({"iterations": options.adaround_iters} if options.adaround
                         else False)
    return dict(sorted(plain.items()))


def _plain(name: str, value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, os.PathLike):
        return Path(value).as_posix()
    if name in ("backend_options", "task_options"):
        return _merge_pairs({}, value) if not isinstance(value, Mapping) else dict(value)
    if name == "input_axes":
        return dict(value)
    if name == "preprocess":
        if isinstance(value, Mapping):
            return dict(value)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in value.options().items()}
    if isinstance(value, tuple | list):
        return list(value)
    return str(value)
