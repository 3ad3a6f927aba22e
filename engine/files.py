"""Every file this project writes: whole or not at all, never through a symlink, only where it belongs.

A run directory or a dataset may come from someone else, and tarballs keep symlinks: a `metrics.jsonl` that points
at ~/.bashrc must not get a line appended to it, nor a `train_config.py` that points anywhere be truncated. So no
file is opened for writing by a name that could be a link:
- write_file() and replacing() put new content in a fresh temporary file beside the target (created with O_EXCL,
  which never follows a symlink), then rename it over the name: a symlink there is replaced, not written through,
  and a reader sees the old file or the new one, never half of one.
- open_nofollow() is for the two files changed in place (the lock, and metrics.jsonl appended to): a symlink
  there is refused in one line.
- fresh_dir() is a new, empty directory of our own for staging a checkpoint or a dataset, and staged_files() one
  for a set of files (an export) renamed into place when all are written: nothing planted in advance is used.
- plain_name() is for a name read from a file (a checkpoint's dataset name) that becomes part of a path: one
  component, so the file cannot name where we write.
A write that fails (full disk, read-only disk, no permission) is one UserError line naming the file, with the
temporary file removed and the target as it was.
"""

import contextlib
import errno
import os
import shutil
import tempfile

from engine.errors import UserError

FULL = (errno.ENOSPC, errno.EDQUOT)
TEMPORARY = ".tmp-"  # in the name of every temporary file and directory: what remove_debris may clear


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import, before any thread could create a file
    os.umask(mask)
    return mask


UMASK = _umask()


def disk_full(e: BaseException, directory: str) -> bool:
    """Whether a failed write was the disk filling up (torch.save and safetensors report it as other errors)."""
    if isinstance(e, OSError) and e.errno in FULL:
        return True
    try:
        return shutil.disk_usage(directory).free < 1 << 20
    except OSError:
        return False


def write_error(e: OSError, path: str, kept: str = "") -> UserError:
    """The one line for a failed write of `path`; `kept` says what is still there (e.g. "the previous checkpoint")."""
    where = f"; {kept} is kept" if kept else ""
    if e.errno in FULL:
        return UserError(f"disk full writing {path}{where}; free space and run again")
    return UserError(f"cannot write {path} ({e.strerror or e}){where}; check the directory's permissions and space")


@contextlib.contextmanager
def replacing(path: str, mode: int = 0o644, kept: str = ""):
    """A binary file to write `path`'s new content into; it replaces `path` (a symlink there included, never what
    it points to) only when the block ends without an error, fsynced first. A failed write is one line."""
    directory = os.path.dirname(path) or "."
    fd, tmp = -1, None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}{TEMPORARY}{os.getpid()}-", dir=directory)
        os.fchmod(fd, mode & ~UMASK)
        with os.fdopen(fd, "wb") as f:
            fd = -1  # the file object owns it now
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise write_error(e, path, kept) from None
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def write_file(path: str, data: bytes | str, mode: int = 0o644, kept: str = "") -> None:
    """Replace `path` with `data` (str as UTF-8) whole, as replacing() does."""
    with replacing(path, mode, kept) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


@contextlib.contextmanager
def staged_files(directory: str):
    """A fresh directory to write a set of files into (an export); when the block ends without an error each is
    renamed into `directory` (made if missing), replacing the file of its name (a symlink there included, never
    what it points to). A failure midway leaves `directory` as it was, and removes it if this made it."""
    created, staging, done = not os.path.isdir(directory), None, False
    try:
        os.makedirs(directory, exist_ok=True)
        staging = fresh_dir(directory, TEMPORARY)
        yield staging
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
        done = True
    except OSError as e:
        raise write_error(e, directory) from None
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
        if created and not done:
            shutil.rmtree(directory, ignore_errors=True)


def open_nofollow(path: str, flags: int, what: str) -> int:
    """os.open(path, flags) for a file changed in place; a symlink at `path` is one line (`what` names the file's
    role, e.g. "the run's metrics"). Other OSErrors propagate for the caller to word."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP and os.path.islink(path):
            raise UserError(symlink_refusal(path, what)) from None
        raise


def symlink_refusal(path: str, what: str) -> str:
    return (
        f"{path} ({what}) is a symlink to {os.readlink(path)}; this project never writes through one: replace it "
        f'with a copy (cp --remove-destination "$(readlink -f {path})" {path}) or remove it'
    )


def fresh_dir(parent: str, prefix: str) -> str:
    """A new empty directory in `parent`, named `prefix`, our pid and random characters, that nobody else created."""
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)


def plain_name(name, what: str, source: str) -> str:
    """`name` (read from `source`) when it is one plain path component, else one line: a file we read never names
    a place outside the directory we write in."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise UserError(f"{source}: {what} {name!r} is not a plain directory name; it cannot say where files go")
    return name


def check_output(path: str, flag: str, inputs: tuple = ()) -> None:
    """Refuse, before any work is done, an output file that cannot be written: a directory, a missing or
    unwritable directory, or one of the run's own inputs (which writing would destroy)."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"{flag}={path} is a directory; give a file name")
    if not os.path.isdir(parent):
        raise UserError(f"{flag}={path}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UserError(f"{flag}={path} cannot be written (no permission)")
    for other in inputs:
        if other and os.path.exists(other) and os.path.exists(path) and os.path.samefile(path, other):
            raise UserError(f"{flag}={path} is also an input of this run; writing it would destroy it")
    owner = _owner(parent)
    if owner and os.path.lexists(path) and (owner == "checkpoint" or os.path.basename(path) in _OWN[owner]):
        raise UserError(f"{flag}={path} is a file of the {owner} in {parent}, not an output: write elsewhere")


_OWN = {  # the files a training run or a dataset has (their own code writes them; an output never replaces one)
    "training run": {".lock", "metrics.jsonl", "train_config.py"},  # (loss_curve.png is redrawn: plot.py may too)
    "dataset": {"meta.json", "tokenizer.json", "input.txt"}
    | {f"{s}{p}.bin" for s in ("train", "val") for p in ("", ".mask", ".starts")},
}


def _owner(directory: str) -> str | None:
    """What `directory` is, when it is a checkpoint, a training run or a prepared dataset."""
    names = set(os.listdir(directory))
    if "COMPLETE" in names:
        return "checkpoint"
    if names & _OWN["training run"]:
        return "training run"
    if "meta.json" in names and names & {"train.bin", "val.bin"}:
        return "dataset"
    return None
