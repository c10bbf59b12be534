"""Outputs written safely.

An output (a model folder, or one file) is checked before any work starts, built under a hidden
staging name beside it and moved into place at the end, so that a failed or interrupted run leaves
nothing half-written. A staging name carries the writer's process id: a later run removes the
staging left by a process that no longer exists (killed, or out of memory).

An existing folder is replaced only with `force`, and only where samba-hf wrote it: the folder's
manifest lists the files samba-hf wrote there with their size and modification time. `force`
replaces those files (if they are unchanged) and keeps every other file. An output that would
contain the current directory or a source of the run is refused outright.
"""

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

MANIFEST = ".samba-hf-manifest.json"
STAGING_MARK = ".samba-hf-staging-"


class OutputPathError(Exception):
    """An output path that cannot be written safely; the message says why and what to do."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _staging_prefix(path: Path) -> str:
    return f".{path.name}{STAGING_MARK}{os.getpid()}-"


def remove_stale_staging(path: Path) -> list[Path]:
    """Remove the staging folders and files of `path` whose writing process no longer exists."""
    removed = []
    if not path.parent.is_dir():
        return removed
    for staging in path.parent.glob(f".{path.name}{STAGING_MARK}*"):
        pid = staging.name[len(f".{path.name}{STAGING_MARK}") :].split("-", 1)[0]
        if not pid.isdigit() or _process_exists(int(pid)):
            continue
        _remove(staging)
        logger.warning("removed %s, left by an interrupted run", staging)
        removed.append(staging)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _file_stamp(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _files_below(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def read_manifest(folder: Path) -> dict[str, dict] | None:
    """{relative path: {"size", "mtime_ns"}} of the files samba-hf wrote in `folder`; None without a manifest."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as error:
        raise OutputPathError(f"{Path(folder) / MANIFEST} is unreadable ({error}); move the folder away.") from error


def _write_manifest(folder: Path) -> None:
    files = {name: _file_stamp(folder / name) for name in _files_below(folder) if name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"written_by": "samba-hf", "files": files}, indent=1), encoding="utf-8")


class _StagedOutput:
    """What OutputFolder and OutputFile share: the checks, the staging name, the cleanup."""

    kind = "output"

    def __init__(self, path, force: bool = False, sources=()):
        self.path = Path(path)
        self.force = force
        self.sources = [Path(source) for source in sources]
        self.staging: Path | None = None
        self.check()

    def check(self) -> None:
        resolved = self.path.resolve()
        protected = [(Path.cwd(), "the current directory")] + [(source, "the source") for source in self.sources]
        for other, what in protected:
            other = other.resolve()
            if resolved == other or resolved in other.parents:
                raise OutputPathError(
                    f"the {self.kind} {self.path} would replace or contain {what} ({other}); choose another path."
                )
        parent = resolved.parent
        if not parent.is_dir():
            raise OutputPathError(
                f"{self.path.parent} is not an existing folder; create it first or choose another path."
            )

    def _make_staging(self) -> Path:
        raise NotImplementedError

    def __enter__(self):
        if self.staging is not None:  # entered already, by the caller that checked the path before its work
            return self
        remove_stale_staging(self.path)
        try:
            self.staging = self._make_staging()
        except OSError as error:
            raise OutputPathError(
                f"cannot write in {self.path.parent} ({error.strerror}); choose another path."
            ) from None
        return self

    def discard(self) -> None:
        if self.staging is not None:
            _remove(self.staging)
        self.staging = None

    def __exit__(self, exc_type, exc, traceback):
        self.discard()  # after commit there is nothing left to discard
        return False


class OutputFolder(_StagedOutput):
    """A folder to write, checked now: use it as a context manager, write into `.staging`, then
    `commit()`. Leaving the `with` block without a commit (an error, Ctrl-C, SIGTERM turned into an
    exception) removes the staging folder."""

    kind = "output folder"

    def check(self) -> None:
        super().check()
        if self.path.exists() and not self.path.is_dir():
            raise OutputPathError(f"{self.path} is a file, not a folder; choose a folder path.")
        if not self.path.is_dir() or not any(self.path.iterdir()):
            return
        manifest = read_manifest(self.path)
        if manifest is None:
            raise OutputPathError(
                f"{self.path} already exists and holds files samba-hf did not write; choose a new or empty folder "
                "(--force replaces only what samba-hf wrote, and never deletes other files)."
            )
        if not self.force:
            raise OutputPathError(
                f"{self.path} holds an earlier samba-hf output; pass --force (force=True in Python) to replace it."
            )
        changed = [
            name
            for name, stamp in manifest.items()
            if (self.path / name).exists() and _file_stamp(self.path / name) != stamp
        ]
        if changed:
            raise OutputPathError(
                f"{', '.join(changed)} in {self.path} changed since samba-hf wrote them; --force replaces only "
                "samba-hf's own files: move them away first."
            )

    def _make_staging(self) -> Path:
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(self.path), dir=self.path.resolve().parent))
        staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would outlive the rename
        return staging

    def commit(self) -> Path:
        """Move the staged files into place; files samba-hf did not write are never touched."""
        self.check()  # again: the folder may have changed while the work ran
        _write_manifest(self.staging)
        if not self.path.exists():
            os.rename(self.staging, self.path)
        else:
            self._replace_into_existing()
        self.staging = None
        return self.path

    def _replace_into_existing(self) -> None:
        old = read_manifest(self.path) or {}
        new = _files_below(self.staging)
        foreign = [name for name in new if name != MANIFEST and name not in old and (self.path / name).exists()]
        if foreign:
            raise OutputPathError(
                f"{self.path} holds {', '.join(foreign)}, which samba-hf did not write and would replace; move "
                "them away or choose another folder."
            )
        for name in old:
            if name not in new:
                (self.path / name).unlink(missing_ok=True)
        for name in sorted(new, key=lambda name: name == MANIFEST):  # the manifest last
            (self.path / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.staging / name, self.path / name)
        shutil.rmtree(self.staging)  # only empty folders are left


class OutputFile(_StagedOutput):
    """One file to write, checked now: write to `.staging` inside the `with` block, then `commit()`.
    An existing file is replaced only with `force`; an output inside a source folder is refused."""

    kind = "output file"

    def check(self) -> None:
        super().check()
        if self.path.is_dir():
            raise OutputPathError(f"{self.path} is a folder; give the path of the file to write.")
        resolved = self.path.resolve()
        for source in self.sources:
            if source.resolve() in resolved.parents:
                raise OutputPathError(f"{self.path} lies inside the source {source}; write it somewhere else.")
        if self.path.exists() and not self.force:
            raise OutputPathError(f"{self.path} already exists; pass --force (force=True in Python) to replace it.")

    def _make_staging(self) -> Path:
        handle, name = tempfile.mkstemp(prefix=_staging_prefix(self.path), dir=self.path.resolve().parent)
        os.close(handle)
        staging = Path(name)
        staging.chmod(0o666 & ~_umask())
        return staging

    def commit(self) -> Path:
        self.check()
        os.replace(self.staging, self.path)
        self.staging = None
        return self.path


__all__ = ["MANIFEST", "OutputFile", "OutputFolder", "OutputPathError", "read_manifest", "remove_stale_staging"]
