"""Ctrl-C at any moment is one line on stderr and exit code 130; child processes end with their parent.

Every entry script imports this module first, before anything heavy (`import torch` takes seconds), so that from
its first moment to its last a Ctrl-C is that line, never a traceback, a silent death or an abort:

- while the script imports and sets up, an uncaught KeyboardInterrupt is the line (sys.excepthook);
- while main() runs (engine/errors.py run_cli), Ctrl-C raises KeyboardInterrupt, so `with` blocks undo half-done
  work (a staged dataset is removed) before run_cli prints the line. An error raised while unwinding from it (a
  library's cleanup that times out, as `datasets`' map does) is the same Ctrl-C. train.py turns the first Ctrl-C
  into a checkpoint, and the second raises at once (engine/runtime.py StopSignals);
- an interrupt that lands in a finalizer (`__del__`, a weakref callback) cannot propagate: Python would print it as
  "Exception ignored" and carry on as if Ctrl-C had not been pressed. sys.unraisablehook stops at once instead;
- the process ends through end_process(), never through the interpreter's finalization. CPython before 3.14 ends
  every thread still running then with pthread_exit the moment it takes the GIL; with a C++ frame on its stack
  (a plot thread inside matplotlib still drawing; gloo's worker
  threads under torchrun, which DDP keeps alive past destroy_process_group, dropping the last reference to a
  tensor) the unwinding calls std::terminate: "terminate called without an active exception", SIGABRT. And a Ctrl-C
  during finalization, after Python has put back SIGINT's default action, kills the process without a word.

Processes forked from one that imported this module (`datasets`' map workers, with --num_proc) ignore SIGINT, since
Ctrl-C reaches the terminal's whole process group and only the parent should report it and stop its workers, and
they die with the process that forked them however it ends, kill -9 included (Linux's PR_SET_PDEATHSIG).

Standard library only, so that importing it costs nothing.
"""

import atexit
import contextlib
import os
import signal
import sys

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command that Ctrl-C ended
MESSAGE = "interrupted; nothing half-written was kept (files are written whole or not at all)"
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when the thread that forked it ends


def interrupted(e: BaseException) -> bool:
    """Whether `e` is a KeyboardInterrupt, or was raised while one was being handled (its context chain holds one)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def stop_now(signum=None, frame=None):
    """Print the one line and end the process at once with exit code 130, running nothing more. Where an interrupt
    could not unwind (it landed in a finalizer), what was being written stays a temporary file or directory that
    readers ignore and the next writer clears, and the files it would have replaced stay as they were."""
    with contextlib.suppress(ValueError):  # (outside the main thread signal handlers cannot be set, nor run)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C more while the line is written changes nothing
    _flush()
    try:
        os.write(2, f"error: {MESSAGE}\n".encode())
    except OSError:  # stderr closed: the exit code still says it
        pass
    os._exit(EXIT_INTERRUPTED)


def end_process(code: int):
    """End the process with `code`: run the atexit functions and flush stdout and stderr as the interpreter would,
    then os._exit, skipping the finalization that can abort (see the module docstring). A Ctrl-C meanwhile is
    stop_now()."""
    signal.signal(signal.SIGINT, stop_now)
    atexit._run_exitfuncs()  # what finalization runs first (multiprocessing's, wandb's); no public way to ask
    _flush()
    os._exit(code)


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # None, closed, or a broken pipe
            pass


def _excepthook(kind, value, traceback):
    if interrupted(value):
        stop_now()
    _previous_excepthook(kind, value, traceback)


def _unraisablehook(unraisable):
    if unraisable.exc_value is not None and interrupted(unraisable.exc_value):
        stop_now()
    _previous_unraisablehook(unraisable)


def _end_with_parent():
    """Fork hooks: a forked child ignores SIGINT and gets SIGKILL when the thread that forked it ends (Linux ties it
    to the thread: the forks here, `datasets`' pools, come from the main thread, which ends with the process)."""
    forking = {}

    def before():
        forking["pid"] = os.getpid()

    def in_child():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if not sys.platform.startswith("linux"):
            return
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != forking.get("pid"):  # the parent died before prctl took effect: no one would kill us
            os._exit(1)

    os.register_at_fork(before=before, after_in_child=in_child)


_previous_excepthook, sys.excepthook = sys.excepthook, _excepthook
_previous_unraisablehook, sys.unraisablehook = sys.unraisablehook, _unraisablehook
_end_with_parent()
