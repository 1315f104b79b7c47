"""Safe outputs: checked before any work starts, written atomically (a reader sees the old
output or the new one, never a half-written one), and never replacing what is not ours."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from torq_onnx.errors import TorqError


def is_within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both resolved by the caller)."""
    return path == folder or folder in path.parents


def require_writable(folder: Path) -> None:
    """Raise a TorqError unless entries can be created in ``folder`` or, where it does not
    exist yet, in its nearest existing ancestor. A probe folder is made and removed: write
    permission bits do not tell (root, read-only mounts, /proc)."""
    base = Path(os.path.abspath(folder))
    while not base.exists() and base.parent != base:
        base = base.parent
    if not base.is_dir():
        raise TorqError(f"cannot write under {folder}: {base} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".torq-onnx-probe-", dir=base))
    except OSError as exc:
        raise TorqError(f"cannot write in {base}: {exc.strerror or exc}") from None


def check_output_file(path: str | Path) -> Path:
    """``path`` made absolute, once it is known that a file can be written there."""
    p = Path(os.path.abspath(path))
    if p.is_dir():
        raise TorqError(f"{path} is a folder: give the output a file name")
    require_writable(p.parent)
    return p


def check_output_folder(path: str | Path, replaceable: Callable[[Path], bool], what: str) -> Path:
    """``path`` made absolute, once it is known that a folder can be written there and that
    replacing it destroys nothing but an empty folder or an earlier output (``replaceable``,
    described as ``what``). Called before the work, so a bad output path fails in a second."""
    p = Path(os.path.abspath(path))
    if p.parent == p:
        raise TorqError("the output folder cannot be the file-system root")
    if p.exists() and not p.is_dir():
        raise TorqError(f"output folder {path} exists and is a file")
    if is_within(Path.cwd().resolve(), p.resolve()):
        raise TorqError(f"output folder {path} is the current folder or holds it: the output replaces its folder whole, "
                        "so give a new one, e.g. -o torq-out")
    if p.is_dir() and any(p.iterdir()) and not replaceable(p):
        raise TorqError(f"output folder {path} is not empty and is not {what}: the output replaces its folder whole, "
                        "so give a new or empty folder")
    require_writable(p.parent)
    return p


def refuse_inputs_inside(out: Path, inputs: dict[str, str | Path | None]) -> None:
    """Raise a TorqError if an input path (``{what: path}``; None and names that are no path
    are skipped) is ``out`` or lies inside it: replacing ``out`` whole would delete it."""
    out = out.resolve()
    for what, path in inputs.items():
        if path is None or not Path(path).exists():
            continue
        if is_within(Path(path).resolve(), out):
            raise TorqError(f"{what} {path} is inside the output folder {out}, which the output replaces whole: "
                            "move it out of that folder or give another output folder")


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary sibling of ``path`` and rename it into place."""
    path = Path(path)
    if path.is_dir():
        raise TorqError(f"{path} is a folder: give the output a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing an existing ``dst`` with at most a rename window."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        if old.is_symlink():  # a link to a folder was replaced, not the folder it named
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
