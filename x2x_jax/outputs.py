"""One policy for every folder a command writes: x2x-edit's and x2x-evaluate's --out, x2x-convert's DST, the latent
cache.

The folder may be new, empty, or an earlier output of the same command holding nothing else (MARKER, written last,
names the command and the entries it wrote; a file the user added since makes it "something else"). The command
writes into a staging folder beside it and swaps that in only when everything succeeded: a failed run leaves the
old folder as it was, a finished one never mixes old and new files. Any other non-empty folder is refused with a
one-line error, unless the user passes --overwrite: it is then replaced as a whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from x2x_jax.errors import ConfigError

MARKER = ".x2x-output"


def written_by(folder: Path) -> str | None:
    """The command that wrote `folder` (from its MARKER), or None."""
    return _marker(folder).get("command")


def _marker(folder: Path) -> dict:
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _foreign(folder: Path, command: str) -> str | None:
    """Why `command` may not replace the non-empty `folder` without --overwrite, or None if it may."""
    marker = _marker(folder)
    if marker.get("command") not in (None, command):
        return f"an output of {marker['command']}"
    added = sorted(p.name for p in folder.iterdir() if p.name not in {MARKER, *marker.get("files", ())})
    if marker.get("command") is None or added:
        return f"files this command did not write ({', '.join(added[:3])}{', ...' if len(added) > 3 else ''})"
    return None


def check(out: Path, command: str, overwrite: bool = False, flag: str = "--out") -> None:
    """One-line ConfigError unless `command` may write `out` under the policy above."""
    out = Path(out)
    name = f"{flag} {out}"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{name} exists and is not a folder")
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"{name} is the current folder or holds it; choose a folder of its own")
    holds = _foreign(out, command) if out.is_dir() and any(out.iterdir()) and not overwrite else None
    if holds:
        raise ConfigError(f"{name} is not empty and holds {holds}; choose a new or empty folder, or pass "
                          "--overwrite to replace it")
    parent = next(a for a in out.absolute().parents if a.exists())
    if not parent.is_dir():
        raise ConfigError(f"{name}: cannot create it ({parent} is a file, not a folder)")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{name}: cannot write it (no write permission in {parent})")


@contextmanager
def staged(out: Path, command: str, flag: str = "--out") -> Iterator[Path]:
    """Yield an empty staging folder; when the block finishes without an exception, mark it as `command`'s and
    put it in place of `out`. Call `check` first: this replaces whatever `out` holds."""
    out = Path(out).absolute()
    anchor = next(a for a in out.parents if a.exists())
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=anchor))
    except OSError as e:
        raise ConfigError(f"{flag} {out}: cannot be written ({type(e).__name__}: {e.strerror or e})") from e
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the published folder should be an ordinary one
    try:
        yield tmp
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / MARKER).write_text(json.dumps({"command": command, "files": files}) + "\n")
        _swap(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap(new: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        os.replace(new, out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex}")
    os.replace(out, old)
    try:
        os.replace(new, out)
    except OSError:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


OUT_HELP = "new, empty, or an earlier output of this command (replaced as a whole once everything succeeded)"
OVERWRITE_HELP = "replace a non-empty output folder that this command did not write"
