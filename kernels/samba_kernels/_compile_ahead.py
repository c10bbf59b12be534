"""Compiling a computation's Triton kernels in threads, before it runs.

Triton compiles a kernel at its first launch, one after another, then builds a C launcher for it with the host's C
compiler: a first `generate()` on a new machine spends seconds there. Both steps release the GIL for most of
their time (MLIR's passes, ptxas and gcc run outside Python), so they run concurrently in threads, if the kernels
and their specialisations are known before the first launch. `compile_ahead` finds them by a dry run:

    with compile_ahead():
        run_the_computation()   # kernels not compiled yet are not launched: their outputs hold garbage
    run_the_computation()       # every kernel compiled: the real run

Within the context, a launch of a Triton kernel whose specialisation is not compiled yet starts its compilation
(Triton's `JITFunction.preload`) and its launcher's build in a thread pool, and returns without launching; kernels
already compiled run. The exit waits for every compilation and raises the first error. A dry run must not decide
anything from what a kernel writes (it holds garbage), nor write state the real run reads.

It works through Triton's `knobs.runtime.jit_cache_hook`, which Triton asks before it compiles. A hook set before
(a profiler's, say) is kept: it is asked about every compilation, in the pool's threads too, as Triton would ask
it. Under Triton's interpreter, and where the environment sets SAMBA_COMPILE_AHEAD=0, the context does nothing:
kernels compile at their launch.
"""

import concurrent.futures
import contextlib
import contextvars
import os
import threading

import triton
from triton import knobs

from ._common import interpreter_enabled

MAX_THREADS = 16

# The current dry run (None outside one). A context variable: the pool's threads, which compile through the same
# hook, and other threads of the process see None, and launch as usual.
_started: contextvars.ContextVar = contextvars.ContextVar("samba_kernels_compile_ahead", default=None)
# The hook is the process's: it is set while any thread is in a dry run, and hands what it does not take to the
# hook it replaced.
_dry_runs_lock = threading.Lock()
_dry_runs = 0
_replaced_hook = None


def _start_compiling(**hook_arguments):
    """Triton's jit_cache_hook: True (skip the launch) where this dry run compiles the kernel in its pool."""
    started = _started.get()
    if started is None or hook_arguments["is_manual_warmup"]:
        return _replaced_hook(**hook_arguments) if _replaced_hook is not None else None
    key, fn, compile = hook_arguments["key"], hook_arguments["fn"], hook_arguments["compile"]
    function, device = fn.jit_function, compile["device"]
    job = (id(function), device, key)
    if job not in started.jobs:
        started.jobs[job] = started.pool.submit(_compile, function, compile["specialization_data"], device)
    return True


def _compile(function, specialization_data: str, device: int) -> None:
    triton.runtime.driver.active.set_current_device(device)
    kernel = function.preload(specialization_data)  # compiled (or read from Triton's disk cache) and kept
    kernel._init_handles()  # what the first launch would do: build the C launcher, load the binary


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
    def __init__(self, threads: int):
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="samba-compile")
        self.jobs: dict = {}


@contextlib.contextmanager
def compile_ahead(threads: int | None = None):
    """Within: Triton kernels not compiled yet compile in `threads` threads (default: the CPUs, at most
    MAX_THREADS) instead of launching; on exit, waits for them (see the module docstring)."""
    global _dry_runs, _replaced_hook
    switched_off = os.environ.get("SAMBA_COMPILE_AHEAD", "1").strip().lower() in ("0", "false", "off", "no")
    if interpreter_enabled() or switched_off or _started.get() is not None:
        yield
        return
    dry_run = _DryRun(threads or min(os.cpu_count() or 1, MAX_THREADS))
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
