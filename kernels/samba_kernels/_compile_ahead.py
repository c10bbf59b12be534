"""Compiling a computation's Triton kernels in parallel, before it runs.

Triton compiles a kernel at its first launch, one after another, then builds a C launcher for it with the host's C
compiler: a first `generate()` on a new machine spends seconds there. `compile_ahead` finds the kernels and their
specialisations by a dry run, and compiles them all at once:

    with compile_ahead():
        run_the_computation()   # kernels not compiled yet are not launched: their outputs hold garbage
    run_the_computation()       # every kernel compiled: the real run

Within the context, a launch of a Triton kernel whose specialisation is not compiled yet is skipped, and starts its
compilation; kernels already compiled run. The exit waits for every compilation and raises the first error. A dry
run must not decide anything from what a kernel writes (it holds garbage), nor write state the real run reads.

Where the process can fork (Linux), a kernel that no earlier dry run compiled compiles in a forked child: its
`JITFunction.preload` writes Triton's disk cache, and a pool thread waits for the child, then loads what it left
(`preload` again, now a read of the disk cache) and builds its launcher (`_init_handles`). Threads alone compile about
2.5 at a time, however many there are: Triton's front end is Python, under the interpreter's lock
(docs/performance-notes.md). A kernel that an earlier dry run compiled (its marker is in Triton's cache folder) loads
in a thread without a fork: there, the fork would cost more than the load. A child uses no CUDA (a fork of a process
that has initialised CUDA cannot) and builds no launcher: the pool's threads may be loading one when it is forked,
and a child must need no lock that they hold. A child that fails, or runs past CHILD_TIMEOUT_S, leaves its kernel to
its thread, which compiles it and raises its error. After a fork slower than SLOW_FORK_S (a process holding much
memory), and elsewhere, and where the environment sets SAMBA_COMPILE_AHEAD=threads, the pool's threads compile.

It works through Triton's `knobs.runtime.jit_cache_hook`, which Triton asks before it compiles. A hook set before
(a profiler's, say) is kept: it is asked about every compilation, in the pool's threads (and the children) too, as
Triton would ask it. Under Triton's interpreter, and where the environment sets SAMBA_COMPILE_AHEAD=0, the context
does nothing: kernels compile at their launch.
"""

import concurrent.futures
import contextlib
import contextvars
import hashlib
import os
import pathlib
import signal
import sys
import threading
import time
import warnings

import triton
from triton import knobs

from ._common import interpreter_enabled

MAX_THREADS = 16
CHILD_TIMEOUT_S = 120.0  # a child compiling longer is taken for hung: its thread compiles the kernel instead
CHILD_POLL_S = 0.005
# A fork copies the process's page tables: 11-21 ms on the H200 beside samba-421m. A fork slower than this (a process
# holding tens of GB) would cost more than the parallel compile saves: the dry run's later kernels compile in threads.
SLOW_FORK_S = 0.1

# The current dry run (None outside one). A context variable: the pool's threads, which compile through the same
# hook, and other threads of the process see None, and launch as usual.
_started: contextvars.ContextVar = contextvars.ContextVar("samba_kernels_compile_ahead", default=None)
# The hook is the process's: it is set while any thread is in a dry run, and hands what it does not take to the
# hook it replaced.
_dry_runs_lock = threading.Lock()
_dry_runs = 0
_replaced_hook = None


def _start_compiling(**hook_arguments):
    """Triton's jit_cache_hook: True (skip the launch) where this dry run compiles the kernel."""
    started = _started.get()
    if started is None or hook_arguments["is_manual_warmup"]:
        return _replaced_hook(**hook_arguments) if _replaced_hook is not None else None
    key, fn, compile = hook_arguments["key"], hook_arguments["fn"], hook_arguments["compile"]
    function, specialization, device = fn.jit_function, compile["specialization_data"], compile["device"]
    job = (id(function), device, key)
    if job not in started.jobs:
        child, marker = None, _marker(function, specialization)
        if started.children is not None and not (marker is not None and marker.exists()):
            child = started.children.start(function, specialization, device)
        started.jobs[job] = started.pool.submit(_load, started.children, function, specialization, device, child)
    return True


def _load(children, function, specialization_data: str, device: int, child: int | None) -> None:
    """A pool thread's job: the kernel loaded from what its child left in Triton's disk cache, or compiled here."""
    if child is not None:
        children.wait(child)  # a failed child leaves the compile, and its error, to preload
    triton.runtime.driver.active.set_current_device(device)
    kernel = function.preload(specialization_data)  # compiled (or read from Triton's disk cache) and kept
    kernel._init_handles()  # what the first launch would do: build the C launcher, load the binary
    marker = _marker(function, specialization_data)
    if marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()


def _marker(function, specialization_data: str) -> pathlib.Path | None:
    """The file that says a dry run compiled this specialisation into Triton's disk cache: a hint only (a kernel
    missing from the cache compiles in its thread). None where Triton's JIT function has no source hash (its
    internals moved): every kernel then compiles in a child."""
    source = getattr(function, "cache_key", None)
    if source is None:
        return None
    key = f"{triton.__version__}\0{source}\0{specialization_data}"
    return pathlib.Path(knobs.cache.dir) / "samba_compile_ahead" / hashlib.sha256(key.encode()).hexdigest()


def _compile_in_child(function, specialization_data: str, device: int) -> None:
    """A forked child's work: the kernel into Triton's disk cache; never returns."""
    status = 1
    try:
        _started.set(None)  # the child compiles as Triton would, outside any dry run
        driver = triton.runtime.driver.active
        driver.get_current_device = lambda: device  # PyTorch's answer would initialise CUDA, which a fork cannot
        function.preload(specialization_data)
        status = 0
    finally:
        os._exit(status)  # no exit handlers: they are the parent's


class _Children:
    """Forked compilations: at most `limit` at once (none after a slow fork), each with its deadline; exit statuses
    by process id."""

    def __init__(self, limit: int):
        self.limit, self.deadlines, self.statuses = limit, {}, {}
        self.lock = threading.Lock()  # the dry run's thread and the pool's poll the children

    def start(self, function, specialization_data: str, device: int) -> int | None:
        if self.limit == 0:
            return None
        while len(self.deadlines) >= self.limit:
            for child in list(self.deadlines):
                self._poll(child)
            time.sleep(CHILD_POLL_S)
        try:
            with warnings.catch_warnings():
                # Python 3.12 warns of any fork in a process with threads; the child's work needs no lock a thread
                # may hold (the module docstring), and a hung child is killed at its deadline.
                warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
                forked = time.monotonic()
                child = os.fork()
        except OSError:  # out of processes or memory: its thread compiles it
            return None
        if child == 0:
            _compile_in_child(function, specialization_data, device)
        now = time.monotonic()
        if now - forked > SLOW_FORK_S:
            self.limit = 0
        self.deadlines[child] = now + CHILD_TIMEOUT_S
        return child

    def wait(self, child: int) -> None:
        while child not in self.statuses:
            self._poll(child)
            time.sleep(CHILD_POLL_S)

    def _poll(self, child: int) -> None:
        with self.lock:
            if child in self.statuses:
                return
            finished, status = os.waitpid(child, os.WNOHANG)
            if not finished and time.monotonic() > self.deadlines[child]:
                os.kill(child, signal.SIGKILL)
                finished, status = os.waitpid(child, 0)
            if finished:
                del self.deadlines[child]
                self.statuses[child] = status


def _prime_triton() -> None:
    """Triton's one-time work before its first compile, done here once, before the pool starts: Triton caches its
    results with functools' lru_cache, which does not lock, so every pool thread would do it at once (on the H200,
    each load from Triton's disk cache then took 0.5 s instead of 0.01). It hashes Triton's own files (triton_key),
    asks ptxas for its version (the backend's hash) and loads Triton's CUDA helpers (which find libcuda, for the
    launchers' builds). These are Triton's internals: skipped where they moved."""
    try:
        from triton.compiler.compiler import make_backend
        from triton.runtime.cache import triton_key

        driver = triton.runtime.driver.active
        triton_key()
        make_backend(driver.get_current_target()).hash()
        driver.utils  # noqa: B018 (loaded on first access)
    except (ImportError, AttributeError):
        return


class _DryRun:
    def __init__(self, threads: int, fork: bool):
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="samba-compile")
        self.jobs: dict = {}
        self.children = _Children(threads) if fork else None


@contextlib.contextmanager
def compile_ahead(threads: int | None = None):
    """Within: Triton kernels not compiled yet compile, in up to `threads` forked children or threads at once
    (default: the CPUs, at most MAX_THREADS), instead of launching; on exit, waits for them (see the module
    docstring)."""
    global _dry_runs, _replaced_hook
    mode = os.environ.get("SAMBA_COMPILE_AHEAD", "1").strip().lower()
    if interpreter_enabled() or mode in ("0", "false", "off", "no") or _started.get() is not None:
        yield
        return
    fork = mode != "threads" and sys.platform == "linux"
    dry_run = _DryRun(threads or min(os.cpu_count() or 1, MAX_THREADS), fork)
    _prime_triton()
    with _dry_runs_lock:
        if _dry_runs == 0:
            _replaced_hook, knobs.runtime.jit_cache_hook = knobs.runtime.jit_cache_hook, _start_compiling
        _dry_runs += 1
    token = _started.set(dry_run)
    try:
        yield
    finally:
        _started.reset(token)
        with _dry_runs_lock:
            _dry_runs -= 1
            if _dry_runs == 0:
                knobs.runtime.jit_cache_hook, _replaced_hook = _replaced_hook, None
        with dry_run.pool:
            errors = [job.exception() for job in dry_run.jobs.values()]
    error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise error
