"""samba_kernels.compile_ahead: within a dry run, Triton's pre-compile hook starts each new specialisation's compile
once, in a forked child (Linux; not for one an earlier dry run compiled) or a pool thread, and skips its launch; a
pool thread loads what the child left, or compiles where the child failed or hung; the exit waits for them and raises
their errors; outside, and under the interpreter, launches are Triton's own; a hook set before is kept. Triton's side
is faked here (no GPU); tests/gpu checks that a first generate() compiles nothing at a launch."""

import os
import sys
import threading
import time
import types

import pytest
import triton
from triton import knobs

from samba_kernels import _compile_ahead as compile_ahead_module
from samba_kernels._compile_ahead import compile_ahead


class FakeDriver:
    def __init__(self):
        self.devices = []

    def set_current_device(self, device):
        self.devices.append(device)


class FakeKernel:
    def __init__(self, log):
        self.log = log

    def _init_handles(self):
        self.log.append(("launcher", threading.current_thread().name))


class FakeJitFunction:
    """What the hook reads of a JITFunction: preload(specialisation) compiles and returns the compiled kernel."""

    def __init__(self, error=None):
        self.log, self.error = [], error
        self.cache_key = f"source-{id(self)}"

    def preload(self, specialization_data):
        time.sleep(0.01)
        if self.error is not None:
            raise self.error
        self.log.append((specialization_data, threading.current_thread().name))
        return FakeKernel(self.log)


def launch(function, key, device=0):
    """Triton's call of the hook before it compiles `function` (as JITFunction._call_hook makes it): True skips
    the compile and the launch."""
    hook = knobs.runtime.jit_cache_hook
    if hook is None:
        return None
    info = types.SimpleNamespace(jit_function=function)
    compile_args = {"key": key, "device": device, "specialization_data": f"spec-{key}"}
    return hook(key=key, repr="", fn=info, compile=compile_args, is_manual_warmup=False, already_compiled=False)


@pytest.fixture
def driver(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    fake = FakeDriver()
    monkeypatch.setattr(triton.runtime.driver, "_active", fake)
    monkeypatch.setattr(compile_ahead_module, "_prime_triton", lambda: None)  # Triton's own caches: a GPU's
    return fake


def test_each_new_specialisation_compiles_once_in_a_pool_thread_and_is_not_launched(driver):
    first, second = FakeJitFunction(), FakeJitFunction()
    with compile_ahead(threads=2):
        assert launch(first, "a") and launch(first, "a") and launch(first, "b", device=1) and launch(second, "a")
    assert knobs.runtime.jit_cache_hook is None  # launches after the dry run are Triton's own
    assert launch(first, "c") is None
    compiled = [entry for entry in first.log if entry[0] != "launcher"]
    assert sorted(spec for spec, _ in compiled) == ["spec-a", "spec-b"]
    assert all(thread.startswith("samba-compile") for _, thread in first.log + second.log)
    assert sum(entry[0] == "launcher" for entry in first.log) == 2  # each compiled kernel's launcher is built
    assert sorted(driver.devices) == [0, 0, 1]


def test_a_failed_compile_raises_at_the_exit(driver):
    with pytest.raises(RuntimeError, match="out of shared memory"):
        with compile_ahead(threads=2):
            launch(FakeJitFunction(error=RuntimeError("out of shared memory")), "a")
    assert knobs.runtime.jit_cache_hook is None


def test_the_pool_threads_and_a_nested_dry_run_compile_as_usual(driver):
    function = FakeJitFunction()
    with compile_ahead(threads=2):
        with compile_ahead(threads=2):  # the outer dry run's
            assert launch(function, "a")
        seen_in_thread = []
        worker = threading.Thread(target=lambda: seen_in_thread.append(launch(function, "b")))
        worker.start()
        worker.join()
        assert seen_in_thread == [None]  # another thread is not in this dry run: it compiles and launches


def test_a_hook_set_before_is_asked_about_every_compile_and_set_back(driver, monkeypatch):
    asked = []

    def profilers_hook(**kwargs):
        asked.append((kwargs["key"], threading.current_thread().name))
        return None

    class PreloadAsksTheHook(FakeJitFunction):
        def preload(self, specialization_data):  # as Triton's preload compiles: asking the hook first
            assert launch(self, specialization_data) is None
            return super().preload(specialization_data)

    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", profilers_hook)
    with compile_ahead(threads=2):
        assert launch(PreloadAsksTheHook(), "a")
    assert knobs.runtime.jit_cache_hook is profilers_hook
    assert [(key, thread.startswith("samba-compile")) for key, thread in asked] == [("spec-a", True)]


class ProcessLog(FakeJitFunction):
    """Writes each preload's specialisation and whether a child or the parent ran it to a file, which the parent reads
    after the children exit."""

    def __init__(self, path, in_child=None):
        super().__init__()
        self.path, self.parent, self.in_child = path, os.getpid(), in_child

    def preload(self, specialization_data):
        if os.getpid() != self.parent and self.in_child is not None:
            self.in_child()
        with open(self.path, "a") as log:
            log.write(f"{specialization_data} {'child' if os.getpid() != self.parent else 'parent'}\n")
        return super().preload(specialization_data)

    def lines(self):
        return open(self.path).read().split("\n")[:-1] if os.path.exists(self.path) else []


forks = pytest.mark.skipif(sys.platform != "linux", reason="children are forked on Linux")


@forks
def test_children_compile_threads_load_and_a_later_dry_run_forks_no_more(driver, tmp_path):
    function = ProcessLog(tmp_path / "log")
    with compile_ahead(threads=2):
        assert launch(function, "a") and launch(function, "b") and launch(function, "c")
    lines = function.lines()
    for spec in ("spec-a", "spec-b", "spec-c"):
        assert lines.index(f"{spec} child") < lines.index(f"{spec} parent")  # loaded after its child exited
    assert len(lines) == 6
    function.preload = ProcessLog(tmp_path / "again").preload  # a new process: the same kernel, compiled
    with compile_ahead(threads=2):
        assert launch(function, "a") and launch(function, "d")
    assert sorted(ProcessLog(tmp_path / "again").lines()) == ["spec-a parent", "spec-d child", "spec-d parent"]


@forks
def test_after_a_slow_fork_the_dry_run_compiles_in_threads(driver, tmp_path, monkeypatch):
    monkeypatch.setattr(compile_ahead_module, "SLOW_FORK_S", 0.0)
    function = ProcessLog(tmp_path / "log")
    with compile_ahead(threads=2):
        assert launch(function, "a") and launch(function, "b")
    assert sorted(function.lines()) == ["spec-a child", "spec-a parent", "spec-b parent"]


@forks
def test_without_a_source_hash_every_dry_run_forks(driver, tmp_path):
    function = ProcessLog(tmp_path / "log")
    del function.cache_key  # a Triton whose JIT functions no longer say their source's hash
    for _ in range(2):
        with compile_ahead(threads=2):
            assert launch(function, "a")
    assert function.lines() == ["spec-a child", "spec-a parent"] * 2


@forks
@pytest.mark.parametrize("child_fails", ["raises", "hangs"])
def test_a_failed_or_hung_child_leaves_the_compile_to_its_thread(driver, tmp_path, monkeypatch, child_fails):
    def in_child():
        if child_fails == "raises":
            raise RuntimeError("a child's compile failed")
        time.sleep(60)

    monkeypatch.setattr(compile_ahead_module, "CHILD_TIMEOUT_S", 0.5)
    function = ProcessLog(tmp_path / "log", in_child)
    started = time.monotonic()
    with compile_ahead(threads=2):
        assert launch(function, "a")
    assert function.lines() == ["spec-a parent"] and time.monotonic() - started < 10


def test_threads_compile_where_children_are_switched_off(driver, tmp_path, monkeypatch):
    monkeypatch.setenv("SAMBA_COMPILE_AHEAD", "threads")
    function = ProcessLog(tmp_path / "log")
    with compile_ahead(threads=2):
        assert launch(function, "a")
    assert function.lines() == ["spec-a parent"]
    assert [thread.startswith("samba-compile") for spec, thread in function.log if spec != "launcher"] == [True]


@pytest.mark.parametrize("variable", ["TRITON_INTERPRET=1", "SAMBA_COMPILE_AHEAD=0"])
def test_nothing_changes_under_the_interpreter_or_switched_off(driver, monkeypatch, variable):
    monkeypatch.setenv(*variable.split("="))
    with compile_ahead():
        assert launch(FakeJitFunction(), "a") is None
    assert compile_ahead_module._dry_runs == 0
