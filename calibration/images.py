"""Image folders as calibration data, with preprocessing the user can see and set.

Every image goes through, in this order (torchvision's classic transforms)::

    decode -> colour (rgb, bgr or gray) -> resize the shorter side to ``resize``
           -> centre crop to ``crop`` (h, w) -> x = pixel * scale (pixels are 0..255)
           -> (x - mean) / std per channel -> layout NCHW or NHWC, batch axis of 1

Defaults come from the model where it says something: the crop is the model's fixed input
size, the layout and the colour follow the position and size (1 or 3) of its channel axis.
The rest defaults to torchvision's ImageNet recipe for colour models (``resize`` =
crop / 0.875, ``scale`` 1/255, ImageNet mean and std) and to plain [0, 1] pixels for gray
ones (mean 0, std 1). A setting that contradicts the model (3 colours for a 1-channel
input, a crop that is not its fixed size) is refused. :meth:`Preprocessing.to_dict` is what
the report records.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from qtool.calibration.loader import InputSpec, Loader, Sample

from qtool.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COLORS = ("rgb", "bgr", "gray")
LAYOUTS = ("NCHW", "NHWC")
PREPROCESS_KEYS = ("resize", "crop", "mean", "std", "scale", "layout", "color")


@dataclass(frozen=True)
class Preprocessing:
    """Preprocessing settings as given (None: the default for the model).

    Attributes:
        resize: Shorter side before the centre crop; 0 resizes straight to the crop.
        crop: Output ``(height, width)`` (an int for a square).
        mean: Per-channel mean, in the output's channel order, after ``scale``.
        std: Per-channel std, same order.
        scale: Factor on the 0..255 pixel values before mean/std.
        layout: "NCHW" or "NHWC".
        color: "rgb", "bgr" or "gray".
    """

    resize: int | None = None
    crop: int | tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float | None = None
    layout: str | None = None
    color: str | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any],
                     source: str = "preprocessing") -> Preprocessing:
        """Settings from a dict (a recipe's ``preprocess`` section); unknown keys refused.

        Raises:
            DataError: An unknown key or a value of the wrong kind.
        """
        unknown = sorted(set(values) - set(PREPROCESS_KEYS))
        if unknown:
            raise DataError(f"{source}: unknown key(s) {', '.join(map(str, unknown))}",
                            f"preprocessing keys: {', '.join(PREPROCESS_KEYS)}")
        try:
            return cls(
                resize=None if values.get("resize") is None else int(values["resize"]),
                crop=None if values.get("crop") is None else parse_size(values["crop"]),
                mean=None if values.get("mean") is None else parse_floats(values["mean"]),
                std=None if values.get("std") is None else parse_floats(values["std"]),
                scale=None if values.get("scale") is None else float(values["scale"]),
                layout=None if values.get("layout") is None else str(values["layout"]).upper(),
                color=None if values.get("color") is None else str(values["color"]).lower(),
            )
        except (TypeError, ValueError) as exc:
            raise DataError(f"{source}: {exc}", "see qtool calibrate --help") from exc

    def over(self, base: Preprocessing) -> Preprocessing:
        """These settings, with ``base``'s where these are None."""
        return Preprocessing(**{
            key: getattr(self, key) if getattr(self, key) is not None else getattr(base, key)
            for key in PREPROCESS_KEYS
        })

    def options(self) -> dict[str, Any]:
        """The settings that are set, as :func:`load_data` options."""
        return {k: getattr(self, k) for k in PREPROCESS_KEYS if getattr(self, k) is not None}


def parse_size(value) -> tuple[int, int]:
    """``224``, ``"224"``, ``"224x192"`` or ``[224, 192]`` as ``(height, width)``."""
    if isinstance(value, str):
        parts = value.lower().replace(",", "x").split("x")
        value = [int(p) for p in parts if p.strip()]
    if isinstance(value, int):
        value = [value]
    size = tuple(int(v) for v in value)
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size {value!r}: give H or HxW (positive)")
    return size


def parse_floats(value) -> tuple[float, ...]:
    """``"0.5,0.5,0.5"``, ``0.5`` or a list as a tuple of floats."""
    if isinstance(value, str):
        return tuple(float(v) for v in value.split(",") if v.strip())
    if isinstance(value, (int, float)):
        return (float(value),)
    return tuple(float(v) for v in value)


class ImageFolder(Loader):
    """Images of a folder (recursively), preprocessed as the module docstring says.

    Args:
        path: The folder.
        size: Output height and width (an int for a square, or ``(h, w)``): the crop.
        resize: Shorter side before the centre crop; default ``round(size / 0.875)``
            (256 for 224); 0 resizes straight to ``size``.
        mean: Per-channel mean subtracted after scaling, in the output's channel order
            (BGR order when ``bgr``, as Caffe-style means are given). Default: ImageNet's
            for colour, 0 for gray.
        std: Per-channel std divided by, in the same order (ImageNet's, or 1 for gray).
        channels: 3 (RGB/BGR) or 1 (grayscale).
        bgr: Channel order BGR instead of RGB.
        layout: "NCHW" or "NHWC".
        scale: Factor on the 0..255 pixel values (default 1/255: pixels in [0, 1]).
        color: "rgb", "bgr" or "gray": sets ``channels`` and ``bgr`` at once.
        input_name: The model input the images feed.
        num_samples: Use at most this many images.
        shuffle: Shuffle the file order (seeded).
        seed: Shuffle seed.

    Raises:
        DataError: The folder is missing or holds no images, a setting is invalid; an
            image cannot be decoded (raised when it is reached, naming the file).
    """

    def __init__(self, path, size, *, resize: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 channels: int = 3, bgr: bool = False, layout: str = "NCHW",
                 scale: float | None = None, color: str | None = None,
                 input_name: str = "input", num_samples: int | None = None,
                 shuffle: bool = False, seed: int = 0):
        super().__init__(num_samples, shuffle, seed)
        self.path = Path(path)
        if not self.path.is_dir():
            raise DataError(f"{self.path}: no such folder", "give a folder of jpg/png images")
        self.files = sorted(
            p for p in self.path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not self.files:
            raise DataError(
                f"{self.path}: no images (jpg, jpeg, png, bmp) in the folder",
                "put calibration images there, or give an .npz file",
            )
        if color is not None:
            if color not in COLORS:
                raise DataError(f"color={color!r}: use one of {', '.join(COLORS)}")
            channels, bgr = (1, False) if color == "gray" else (3, color == "bgr")
        if channels not in (1, 3):
            raise DataError(f"channels={channels}: images give 1 or 3 channels")
        self.size = parse_size(size)
        self.resize = round(min(self.size) / 0.875) if resize is None else int(resize)
        if self.resize < 0:
            raise DataError(f"resize={resize}: must be 0 (straight to the crop) or positive")
        self.channels = channels
        self.bgr = bgr
        gray = channels == 1
        self.mean = self._per_channel("mean", mean, (0.0,) if gray else IMAGENET_MEAN)
        self.std = self._per_channel("std", std, (1.0,) if gray else IMAGENET_STD)
        if not np.all(self.std != 0):
            raise DataError(f"std={tuple(self.std.tolist())}: must not be 0")
        self._default_scale = scale is None
        self.scale = 1.0 / 255.0 if scale is None else float(scale)
        if layout not in LAYOUTS:
            raise DataError(f"layout={layout!r}: use 'NCHW' or 'NHWC'")
        self.layout = layout
        self.input_name = input_name

    def _per_channel(self, name: str, given, default) -> np.ndarray:
        values = tuple(float(v) for v in (default if given is None else given))
        if given is not None and len(values) == 1:
            values = values * self.channels
        if given is None:
            values = values[: self.channels]
        if len(values) != self.channels:
            raise DataError(
                f"{name}={values}: {len(values)} values for {self.channels} channel(s)",
                f"give one {name} per channel (or one for all)",
            )
        return np.asarray(values, dtype=np.float32)

    @property
    def color(self) -> str:
        """"rgb", "bgr" or "gray"."""
        return "gray" if self.channels == 1 else ("bgr" if self.bgr else "rgb")

    def to_dict(self) -> dict[str, Any]:
        """The preprocessing applied, as the report records it."""
        return {
            "input": self.input_name,
            "color": self.color,
            "resize": self.resize,
            "crop": list(self.size),
            "scale": float(np.float32(self.scale)),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "layout": self.layout,
        }

    def _total(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[Sample]:
        for index in self._order(len(self.files)):
            yield {self.input_name: self.load(self.files[index])}

    def load(self, file: Path) -> np.ndarray:
        """One preprocessed image, shape ``(1, C, H, W)`` or ``(1, H, W, C)``."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(file) as image:
                image = image.convert("RGB" if self.channels == 3 else "L")
                image = self._resize_crop(image)
                array = np.asarray(image, dtype=np.float32)
                # the default divides (exact as torchvision's ToTensor), a given scale multiplies
                array = array / 255.0 if self._default_scale else array * np.float32(self.scale)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(
                f"{file}: cannot decode the image ({exc})", "remove or replace the file"
            ) from exc
        if array.ndim == 2:
            array = array[:, :, None]
        if self.bgr:
            array = array[:, :, ::-1]
        array = (array - self.mean) / self.std
        if self.layout == "NCHW":
            array = array.transpose(2, 0, 1)
        return np.ascontiguousarray(array[None], dtype=np.float32)

    def _resize_crop(self, image):
        from PIL import Image

        height, width = self.size
        if self.resize == 0:
            return image.resize((width, height), Image.BILINEAR)
        ratio = self.resize / min(image.size)
        new_w = max(width, round(image.size[0] * ratio))
        new_h = max(height, round(image.size[1] * ratio))
        image = image.resize((new_w, new_h), Image.BILINEAR)
        left, top = (new_w - width) // 2, (new_h - height) // 2
        return image.crop((left, top, left + width, top + height))


def image_defaults(specs: list[InputSpec], path: Path, options: Mapping[str, Any]) -> dict:
    """:class:`ImageFolder` options for the model's single rank-4 input, ``options`` over them.

    Raises:
        DataError: Not one rank-4 float32 input; a symbolic size without ``size``/``crop``;
            a layout, colour or crop that contradicts the model's input.
    """
    if len(specs) != 1:
        raise DataError(
            f"{path}: an image folder can feed a single-input model, this one has {len(specs)}",
            "give an .npz with one array per input",
        )
    spec = specs[0]
    if len(spec.shape) != 4:
        raise DataError(
            f"{path}: input {spec.name} has rank {len(spec.shape)}, images need rank 4",
            "give an .npz file instead",
        )
    options = dict(options)
    crop = options.pop("crop", None)
    if crop is not None and options.get("size") is not None:
        raise DataError("give size or crop, not both")
    if crop is not None:
        options["size"] = parse_size(crop)
    layout = options.get("layout") or ("NHWC" if spec.shape[3] in (1, 3) and
                                       spec.shape[1] not in (1, 3) else "NCHW")
    if layout not in LAYOUTS:
        raise DataError(f"layout={layout!r}: use 'NCHW' or 'NHWC'")
    if layout == "NCHW":
        channels, height, width = spec.shape[1], spec.shape[2], spec.shape[3]
    else:
        height, width, channels = spec.shape[1], spec.shape[2], spec.shape[3]
    if spec.dtype != np.float32:
        raise DataError(f"{path}: input {spec.name} is {spec.dtype}; images give float32")
    if channels is not None and channels not in (1, 3):
        raise DataError(
            f"{path}: input {spec.name} {_show(spec.shape)} has {channels} channels on its "
            f"{layout} channel axis; images give 1 or 3",
            "set --layout to the model's layout, or give an .npz file",
        )
    wanted = _channels_of(options)
    if channels is not None and wanted is not None and wanted != channels:
        raise DataError(
            f"{path}: {options.get('color') or f'{wanted} channels'} gives {wanted} channel(s), "
            f"input {spec.name} {_show(spec.shape)} takes {channels}",
            f"use --color {'gray' if channels == 1 else 'rgb or bgr'}",
        )
    size = options.get("size")
    if size is None:
        if height is None or width is None:
            raise DataError(
                f"{path}: input {spec.name} has a symbolic image size",
                "pass the size with --crop HxW",
            )
        size = (height, width)
    size = parse_size(size)
    for axis, have, want in (("height", size[0], height), ("width", size[1], width)):
        if want is not None and have != want:
            raise DataError(
                f"{path}: crop {size[0]}x{size[1]} does not fit input {spec.name} "
                f"{_show(spec.shape)} ({axis} {have} != {want})",
                f"drop --crop (the model's size is used) or give {height}x{width}",
            )
    defaults = {"input_name": spec.name, "layout": layout, "size": size}
    if channels in (1, 3) and "color" not in options:
        defaults["channels"] = channels
    return {**defaults, **options, "size": size, "layout": layout}


def _channels_of(options: Mapping[str, Any]) -> int | None:
    color = options.get("color")
    if color is not None:
        return 1 if color == "gray" else 3
    return options.get("channels")


def _show(shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
