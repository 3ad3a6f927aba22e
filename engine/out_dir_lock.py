"""One training run at a time writes to an out_dir: OutDirLock refuses a second writer, naming the first, and clears
what a writer that died (kill -9, power loss) left behind (engine/checkpoint.py remove_debris). hold_out_dir holds it
for a run on all its ranks.
"""

import contextlib
import errno
import fcntl
import os
import socket
import time

import torch.distributed as dist

from engine.checkpoint import remove_debris
from engine.errors import UserError
from engine.files import open_nofollow, symlink_refusal, write_error
from engine.runtime import teardown_runtime

LOCK_NAME = ".lock"
IN_PLACE = {"metrics.jsonl": "the run's metrics, appended to"}  # besides the lock, the files a run changes in place


class OutDirLock:
    """Holds out_dir for one training run: an exclusive flock on out_dir/.lock, which records the holder's pid and
    host for the message a second writer gets. The kernel drops the flock when its process dies, however it dies, so
    a stale lock is simply taken over. Holding the lock, the run removes the debris of dead writers: half-written
    checkpoint and plot files, and a torn last line of metrics.jsonl. release() lets go (and removes an out_dir that
    this lock created and nothing filled)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.created = not os.path.isdir(out_dir)
        self.path = os.path.join(out_dir, LOCK_NAME)
        try:
            os.makedirs(out_dir, exist_ok=True)
            while True:
                fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT, "the run's lock")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise UserError(
                        f"{out_dir} is in use by another training run ({_holder(self.path)}); wait for it to finish, "
                        "or choose another --out_dir"
                    ) from None
                if _same_file(fd, self.path):
                    break
                os.close(fd)  # the holder removed the file between our open and our flock: lock the new one
        except OSError as e:
            raise UserError(f"cannot write to out_dir {out_dir} ({e.strerror}); choose another --out_dir") from None
        self.fd = fd
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode()
        try:
            os.ftruncate(fd, 0)
            if os.write(fd, holder) != len(holder):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            self.release()
            raise write_error(e, self.path) from None
        for name, what in IN_PLACE.items():  # refused before anything else is touched
            if os.path.islink(os.path.join(out_dir, name)):
                self.release()
                raise UserError(symlink_refusal(os.path.join(out_dir, name), what))
        remove_debris(out_dir)

    def release(self) -> None:
        if self.fd is None:
            return
        os.remove(self.path)  # unlinked while still locked: a writer waiting on this file retries on a new one
        os.close(self.fd)
        self.fd = None
        if self.created and not os.listdir(self.out_dir):
            os.rmdir(self.out_dir)


def _same_file(fd: int, path: str) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip() or "pid unknown"
    except OSError:
        return "pid unknown"


@contextlib.contextmanager
def hold_out_dir(out_dir: str, rt):
    """Hold out_dir's lock for the run. The master takes it; under torchrun every rank learns whether it could, so a
    refused run stops on every rank with the same one line instead of leaving the others waiting in a collective."""
    lock, problem = None, None
    if rt.master:
        try:
            lock = OutDirLock(out_dir)
        except UserError as e:
            problem = str(e)
    if rt.ddp:
        shared = [problem]
        dist.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem:
        teardown_runtime(rt)  # every rank is here: leave the process group together, not from gloo's threads at exit
        raise UserError(problem)
    try:
        yield
    finally:
        if lock:
            lock.release()
