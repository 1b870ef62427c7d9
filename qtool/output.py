"""Where a run's files go, written so that no user file is ever lost.

Two shapes of output:

* a folder (the default): the files go into a hidden staging sibling that is renamed into
  place at the end, with a manifest ``.qtool-manifest.json`` listing every file and its
  SHA-256;
* a model file ``NAME.onnx``: the deployable model is written there, the other files beside
  it under the same stem (``NAME.encodings``, ``NAME.report.html``, ...), each staged as a
  hidden temporary file and renamed into place, then the manifest ``NAME.qtool.json``.

An existing output is replaced only with ``force``, and only when qtool wrote it: an empty
folder, or a folder / set of files whose manifest lists every file that is there with the
bytes qtool wrote. Anything else (a file qtool did not write, a folder holding the input
model, the current folder or one of its parents) is refused whatever the flags, and nothing
is left behind by a refused run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from qtool.errors import OutputError

log = logging.getLogger(__name__)

FOLDER_MANIFEST = ".qtool-manifest.json"
FILE_MANIFEST_SUFFIX = ".qtool.json"
MODEL_SUFFIX = ".onnx"
DEPLOYABLE = ("model.onnx", "model.qdq.onnx")  # the first present is what NAME.onnx gets


def is_file_output(output: str | os.PathLike | None) -> bool:
    """True when ``-o`` names a model file (``NAME.onnx``) rather than a folder."""
    return output is not None and str(output).lower().endswith(MODEL_SUFFIX)


def manifest_bytes(files: Mapping[str, bytes], kept: Mapping[str, str] | None = None) -> bytes:
    """The manifest of ``files``: their names and SHA-256, sorted (same files, same bytes).

    ``kept``: name -> SHA-256 of files an earlier run wrote that stay vouched for (a file
    output's previous files that this run read, so did not remove).
    """
    listing = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    listing = dict(sorted({**(kept or {}), **listing}.items()))
    return (json.dumps({"tool": "qtool", "files": listing}, indent=2) + "\n").encode("utf-8")


def _read_manifest(path: Path, *, flat: bool = False) -> dict[str, str] | None:
    """The files a qtool manifest lists (name -> SHA-256), or None if it is not one.

    A manifest is only believed when every entry is what qtool writes: a relative POSIX path
    without ``..`` (``flat``: a bare file name) and a SHA-256 in hex. Anything else (a JSON
    list, ``../x``, an absolute path) makes it no manifest at all, so the files it names are
    treated as files qtool did not write: refused, never deleted.
    """
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("tool") != "qtool":
        return None
    files = manifest.get("files")
    if not isinstance(files, dict):
        return None
    if not all(_manifest_name(k, flat) and _is_digest(v) for k, v in files.items()):
        return None
    return dict(files)


def _manifest_name(name: object, flat: bool) -> bool:
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return False
    parts = name.split("/")
    if flat and len(parts) > 1:
        return False
    return not name.startswith("/") and all(part not in ("", ".", "..") for part in parts)


def _is_digest(value: object) -> bool:
    return (isinstance(value, str) and len(value) == 64
            and all(c in "0123456789abcdef" for c in value))


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def input_files(model: str | os.PathLike | None,
                *others: str | os.PathLike | None) -> list[Path]:
    """Every file a run reads: ``model``, its external data files, and ``others`` given.

    These are never written, replaced or removed as stale, whatever the flags. The external
    data locations are read from the model without loading the data.
    """
    paths = [Path(p) for p in (model, *others) if p is not None]
    if model is not None and Path(model).is_file():
        import onnx

        try:
            proto = onnx.load_model(str(model), load_external_data=False)
        except Exception:  # noqa: BLE001  (not ONNX: loading it reports that properly)
            proto = None
        if proto is not None:
            from onnx.external_data_helper import _get_all_tensors

            for tensor in _get_all_tensors(proto):
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    info = {e.key: e.value for e in tensor.external_data}
                    if info.get("location"):
                        paths.append(Path(model).parent / info["location"])
    return list(dict.fromkeys(paths))


def refuse_protected(folder: Path, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse an output folder that holds an input, or is the current folder or a parent.

    Raises:
        OutputError: Always for such a folder, whatever the flags.
    """
    target = folder.resolve()
    if _inside(Path.cwd().resolve(), target):
        raise OutputError(
            f"{folder}: the output folder is the current folder or one of its parents",
            "choose a new folder below it, e.g. -o out/",
        )
    for item in inputs:
        if _inside(Path(item).resolve(), target):
            raise OutputError(
                f"{folder}: the output folder holds the input {item}; qtool never replaces it",
                "choose another output folder",
            )


def foreign_entries(folder: Path) -> list[str]:
    """The entries of ``folder`` its qtool manifest does not vouch for (all, without one).

    An entry is vouched for when the manifest lists it with the bytes that are there now.
    """
    listed = _read_manifest(folder / FOLDER_MANIFEST) or {}
    foreign = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if name == FOLDER_MANIFEST and listed:
            continue
        if path.is_dir() and not path.is_symlink():
            if not any(k.startswith(name + "/") for k in listed):
                foreign.append(name + "/")
            continue
        if path.is_symlink() or listed.get(name) != _sha256(path):
            foreign.append(name)
    return foreign


def _describe(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


class staging_folder:  # noqa: N801  (used as a context manager, reads like a function)
    """A temporary sibling of ``folder`` that becomes ``folder`` on success.

    Entering checks the target and creates the staging folder at once, so an unwritable
    location fails before any work: a non-empty folder is refused without ``force``, and
    with it unless qtool wrote every file in it (its manifest); a folder that holds an
    input, or is the current folder or a parent of it, is always refused. Leaving with an
    exception removes the staging folder; leaving normally checks the target again (a run
    takes minutes, and a file written into the folder meanwhile is not qtool's), writes the
    manifest and renames the staging folder into place. An existing folder is moved aside
    first; of it only the files its manifest vouches for are removed after the swap, so a
    file that slipped in during the swap itself is kept (and named in a log warning).
    """

    def __init__(self, folder: Path, *, force: bool, inputs: Iterable[str | os.PathLike] = ()):
        self.folder = Path(os.path.abspath(folder))
        self.shown = Path(folder)
        self.force = force
        self.inputs = tuple(inputs)
        self.path: Path | None = None

    def _vet(self) -> None:
        """Refuse the target as it is now (see the class docstring)."""
        folder, shown = self.folder, self.shown
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"{shown}: exists and is not a folder", "choose a folder path")
        refuse_protected(shown, self.inputs)
        if folder.is_dir() and any(folder.iterdir()):
            if not self.force:
                raise OutputError(
                    f"{shown}: output folder exists and is not empty",
                    "pass --force to replace a folder qtool wrote, or choose another folder",
                )
            foreign = foreign_entries(folder)
            if foreign:
                unlisted = not (folder / FOLDER_MANIFEST).is_file()
                raise OutputError(
                    f"{shown}: not replaced: it holds files qtool did not write "
                    f"({_describe(foreign)})",
                    "--force only replaces a folder qtool wrote; choose another folder"
                    + (f" (no {FOLDER_MANIFEST}: an output of an older qtool must be "
                       "removed by hand)" if unlisted else ""),
                )

    def __enter__(self) -> Path:
        folder, shown = self.folder, self.shown
        self._vet()
        parent = folder.parent
        blocking = next((p for p in (parent, *parent.parents) if p.exists()), None)
        if blocking is not None and not blocking.is_dir():
            raise OutputError(
                f"{shown}: cannot create the output folder: {blocking} is a file",
                "choose an output folder whose parents are folders",
            )
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=parent))
        except OSError as exc:
            raise OutputError(
                f"{shown}: cannot write the output folder ({exc.strerror})",
                "choose a writable location with -o",
            ) from exc
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        staging = self.path
        if staging is None:
            return
        if exc_type is not None:
            shutil.rmtree(staging, ignore_errors=True)
            return
        try:
            self._vet()  # again: the folder may have changed while the run worked
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            written = {
                p.relative_to(staging).as_posix(): p.read_bytes()
                for p in sorted(staging.rglob("*")) if p.is_file()
            }
            (staging / FOLDER_MANIFEST).write_bytes(manifest_bytes(written))
            os.chmod(staging / FOLDER_MANIFEST, 0o644)
            os.chmod(staging, 0o755)
            if self.folder.exists():
                aside = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.", suffix=".old",
                                              dir=self.folder.parent))
                os.rename(self.folder, aside / "old")
                os.rename(staging, self.folder)
                _remove_written(aside)
            else:
                os.rename(staging, self.folder)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise OutputError(
                f"{self.shown}: cannot move the output into place ({exc.strerror})"
            ) from exc


def _remove_written(aside: Path) -> None:
    """Remove a replaced output moved aside: only what its manifest vouches for.

    What is left (a file written in the instant between the last check and the swap) stays
    in ``aside`` and is named in a log warning: qtool deletes nothing it did not write.
    """
    old = aside / "old"
    listed = _read_manifest(old / FOLDER_MANIFEST) or {}
    for name, digest in listed.items():
        path = old / name
        if not path.is_symlink() and path.is_file() and _sha256(path) == digest:
            path.unlink()
    if listed:
        (old / FOLDER_MANIFEST).unlink(missing_ok=True)
    for path in sorted(old.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()
    for path in (old, aside):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    if aside.exists():
        kept = sorted(p.relative_to(old).as_posix() for p in old.rglob("*") if not p.is_dir())
        log.warning("%s: kept files qtool did not write from the replaced output (%s)",
                    aside, _describe(kept))


def fill_folder(folder: Path, files: Mapping[str, bytes]) -> None:
    """Write each file of ``files`` into ``folder`` (a staging folder), in name order."""
    for name, data in sorted(files.items()):
        target = folder / name
        if folder.resolve() not in target.resolve().parents:
            raise OutputError(f"refusing to write {name!r} outside the output folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.write_bytes(data)
            os.chmod(target, 0o644)
        except OSError as exc:
            raise OutputError(f"{target}: cannot write ({exc.strerror})") from exc


def file_names(model_file: str | os.PathLike, files: Mapping[str, bytes]) -> dict[str, str]:
    """Folder file name -> path beside ``model_file`` (``NAME.onnx``) for a file output.

    The deployable model (``model.onnx`` where the backend ships one, else the QDQ model)
    becomes ``NAME.onnx`` (and its external data ``NAME.onnx.data``); every other file
    ``NAME.<its name without 'model.'>``, e.g. ``NAME.encodings``, ``NAME.report.html``.
    """
    target = Path(model_file)
    stem = target.name[: -len(MODEL_SUFFIX)]
    if not stem:
        raise OutputError(f"{target}: give the model file a name", "e.g. -o quantized.onnx")
    deployable = next((name for name in DEPLOYABLE if name in files), None)
    names = {}
    for name in sorted(files):
        if "/" in name:
            raise OutputError(f"{name}: a file output cannot hold sub-folders", "use -o DIR/")
        if name == deployable:
            names[name] = target.name
        elif deployable is not None and name == f"{deployable}.data":
            names[name] = f"{target.name}.data"
        else:
            rest = name[len("model."):] if name.startswith("model.") else name
            names[name] = f"{stem}.{rest}"
    return {name: str(target.with_name(new)) for name, new in names.items()}


def write_beside(model_file: str | os.PathLike, files: Mapping[str, bytes], *, force: bool,
                 inputs: Iterable[str | os.PathLike] = ()) -> dict[str, str]:
    """Write a run's files as ``NAME.onnx`` plus siblings, each atomically, then the manifest.

    Every file is first staged as a hidden temporary file in the target folder; only when
    all are staged are they renamed into place, the manifest ``NAME.qtool.json`` last.
    Files a previous run listed in that manifest and this run does not write are removed,
    except the run's inputs (which stay, listed in the new manifest).

    Args:
        model_file: ``NAME.onnx``.
        files: Folder file name -> bytes (as a folder output would hold them).
        force: Replace existing files, where the previous manifest vouches for them.
        inputs: Paths that must never be written (the input model).

    Returns:
        Folder file name -> path written.

    Raises:
        OutputError: A target exists (without ``force``), is not vouched for by the manifest
            (whatever the flags), is an input, or cannot be written; nothing is left behind.
    """
    names = file_names(model_file, files)
    target = Path(model_file)
    inputs = tuple(inputs)
    files = _relocated(files, names)
    manifest_path, vouched = _check_targets(target, [Path(p) for p in names.values()],
                                            force=force, inputs=inputs)
    folder = target.parent if str(target.parent) else Path(".")
    blocking = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise OutputError(f"{target}: cannot write: {blocking} is a file",
                          "choose an output path whose parents are folders")
    written = {Path(path).name: files[name] for name, path in names.items()}
    # A file of the previous run that this one does not write is stale and removed, unless
    # this run reads it (a QDQ model requantized beside itself): inputs always survive, and
    # stay listed so that a later --force run may replace them.
    protected = {Path(p).resolve() for p in inputs}
    stale, kept = [], {}
    for old, digest in vouched.items():
        path = target.with_name(old)
        if old in written or _sha256(path) != digest:
            continue
        if path.resolve() in protected:
            kept[old] = digest
        else:
            stale.append((path, digest))
    staged: list[tuple[Path, Path]] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, path in sorted(names.items()):
            staged.append((_stage(Path(path), files[name]), Path(path)))
        staged.append((_stage(manifest_path, manifest_bytes(written, kept)), manifest_path))
        for temp, path in staged:
            os.replace(temp, path)
    except OSError as exc:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)
        raise OutputError(f"{target}: cannot write ({exc.strerror})",
                          "choose a writable location with -o") from exc
    except BaseException:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)
        raise
    for path, digest in stale:
        if _sha256(path) == digest:  # still the bytes qtool wrote
            path.unlink(missing_ok=True)
    return names


def _relocated(files: Mapping[str, bytes], names: Mapping[str, str]) -> Mapping[str, bytes]:
    """``files`` with each model that has external data pointing at its renamed data file."""
    from qtool.io import relocate_external

    moved = dict(files)
    for name in files:
        data = f"{name}.data"
        if name.endswith(MODEL_SUFFIX) and data in files:
            moved[name] = relocate_external(files[name], Path(names[data]).name)
    return moved


def check_file_output(model_file: str | os.PathLike, *, force: bool,
                      inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Before any work: would :func:`write_beside` refuse ``NAME.onnx`` or its manifest?

    Raises:
        OutputError: As :func:`write_beside` would, for those two files.
    """
    _check_targets(Path(model_file), [Path(model_file)], force=force, inputs=inputs)


def _check_targets(target: Path, paths: list[Path], *, force: bool,
                   inputs: Iterable[str | os.PathLike]) -> tuple[Path, dict[str, str]]:
    """The manifest path and what it vouches for; raise if a target may not be written."""
    if not target.name[: -len(MODEL_SUFFIX)]:
        raise OutputError(f"{target}: give the model file a name", "e.g. -o quantized.onnx")
    manifest_path = target.with_name(target.name[: -len(MODEL_SUFFIX)] + FILE_MANIFEST_SUFFIX)
    protected = {Path(p).resolve() for p in inputs}
    previous = (_read_manifest(manifest_path, flat=True) if manifest_path.is_file()
                else None)
    vouched = previous or {}
    all_targets = [*paths, manifest_path]
    for path in all_targets:
        if path.resolve() in protected:
            raise OutputError(f"{path}: is the input model; qtool never replaces it",
                              "choose another output file name")
    existing = [p for p in all_targets if p.exists() or p.is_symlink()]
    if existing and not force:
        raise OutputError(
            f"{_describe([str(p) for p in existing])}: exist(s) already",
            "pass --force to replace files qtool wrote, or choose another name",
        )
    foreign = [
        str(p) for p in existing
        if p != manifest_path and (p.is_symlink() or not p.is_file()
                                   or vouched.get(p.name) != _sha256(p))
    ]
    if existing and previous is None:
        foreign = [str(p) for p in existing]
    if foreign:
        raise OutputError(
            f"not replaced: {_describe(foreign)} not written by qtool (no matching "
            f"{manifest_path.name})",
            "--force only replaces files qtool wrote; choose another output name",
        )
    return manifest_path, vouched


def _stage(path: Path, data: bytes) -> Path:
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(temp, 0o644)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return Path(temp)


def refuse_existing_file(path: str | os.PathLike, *, force: bool,
                         inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse to overwrite an existing single file without ``force``, or an input ever.

    Raises:
        OutputError: ``path`` is an input, is a folder, or exists and ``force`` is not set.
    """
    target = Path(path)
    if any(target.resolve() == Path(p).resolve() for p in inputs):
        raise OutputError(f"{target}: is the input model; qtool never replaces it",
                          "choose another output file")
    if target.is_dir():
        raise OutputError(f"{target}: is a folder", "give a file path")
    if target.exists() and not force:
        raise OutputError(f"{target}: exists already", "pass --force to replace it")
