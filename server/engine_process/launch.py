"""Starting the engine process, before the server's own imports where the command line knows it will want one.

On a GPU machine the server's imports (torch with its CUDA libraries, FastAPI) took 8.2 s before loading began,
and the engine process then spent 7.1 s starting and importing before it began to load the model
(bench/results/gpu-h100-2026-12-08-vllm). Neither needs the other meanwhile, so `loraserve serve` starts the engine
process first (`prelaunch`) and the server adopts it once its state is built (`EngineProcess`). That is why this
module imports only the standard library and the settings: nothing here may import torch.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.util import Finalize
from pathlib import Path

from server.engine.faults import FaultPlan
from server.settings import ServerSettings

log = logging.getLogger("loraserve.engine_process")


@dataclass(frozen=True)
class EngineOptions:
    """What the child needs to build the runner and the engine (picklable: it crosses the spawn)."""

    runner: dict  # load_runner's keyword arguments (runner_options)
    prefill_chunk_tokens: int
    log_level: str = "info"
    gil_switch_seconds: float = 0.005


@dataclass
class Launched:
    """A started engine process and the server's ends of its three pipes (the package doc)."""

    options: EngineOptions
    process: multiprocessing.Process
    commands: Connection  # server → engine
    weights: Connection  # server → engine
    events: Connection  # engine → server


def runner_options(settings: ServerSettings) -> dict:
    """load_runner's arguments from the settings (the same in the server's process and in an engine process)."""
    s = settings
    return dict(
        base_model=s.base_model,
        backend=s.backend,
        load_in_4bit=s.load_in_4bit,
        dtype=s.dtype,
        max_context=s.max_context,
        kv_slots=s.max_running,
        adapter_slots=s.adapter_slots,
        max_lora_rank=s.max_adapter_rank,
        kv_memory_fraction=s.kv_memory_fraction,
        cuda_graphs=s.cuda_graphs,
        compile_kernels=s.compile_kernels,
        faults=FaultPlan.from_setting(s.fault_injection),
    )


def engine_options(settings: ServerSettings, *, log_level: str | None = None) -> EngineOptions:
    """The engine process's options; its log level is this process's unless given."""
    number = logging.getLevelName(log_level.upper()) if log_level else None  # an int for a level's name
    if not isinstance(number, int):  # none given, or one logging does not know: this process's own
        number = logging.getLogger().getEffectiveLevel()
    level = logging.getLevelName(number)
    return EngineOptions(
        runner=runner_options(settings),
        prefill_chunk_tokens=settings.prefill_chunk_tokens,
        log_level=level.lower(),  # as the server names it after configuring ("warn" and "WARNING" alike)
        gil_switch_seconds=settings.gil_switch_seconds,
    )


def in_own_process(settings: ServerSettings) -> bool:
    """Whether the engine runs in a process of its own: `engine_process` on, or auto with a GPU, where the shared GIL
    is what a busy server runs out of first (the package doc); on a CPU the model's own work dominates and one
    process starts faster. Decided without torch, so that `loraserve serve` can start it before its imports."""
    return settings.engine_process == "on" or (settings.engine_process == "auto" and gpu_present())


def gpu_present() -> bool:
    """Whether this machine (or container) has an NVIDIA GPU's device file and may use it (torch.cuda answers the
    same on a working GPU machine, after seconds of imports). The device files, not /proc/driver/nvidia: a
    container without GPUs on a GPU host sees the host's driver."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


def launch(options: EngineOptions) -> Launched:
    """Start an engine process with `options`: it begins loading the model at once."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    commands_in, commands = context.Pipe(duplex=False)
    jobs_in, weights = context.Pipe(duplex=False)
    events, events_out = context.Pipe(duplex=False)
    # Not a daemon: a daemonic process may not start processes of its own, which libraries in it do (TorchInductor's
    # compile workers). Its end is ours all the same: killed at exit (Finalize below), and a watchdog in it.
    process = context.Process(
        target=_run_child, args=(options, commands_in, jobs_in, events_out), name="loraserve-engine"
    )
    process.start()
    for end in (commands_in, jobs_in, events_out):  # the child's ends: closed here, so its exit reads as EOF
        end.close()
    launched = Launched(options, process, commands, weights, events)
    # Killed when its owner drops it unstopped, and at exit before multiprocessing joins its children (it would wait
    # for ever on one that ignores SIGTERM).
    Finalize(launched, kill_if_alive, args=(process,), exitpriority=10)
    return launched


_prelaunched: Launched | None = None


def prelaunch(settings: ServerSettings, *, log_level: str) -> bool:
    """Start the engine process now if the server will want one (`in_own_process`); the server adopts it
    (`adopt`). True if one was started."""
    global _prelaunched
    wanted = in_own_process(settings)
    if wanted and _prelaunched is None:
        _prelaunched = launch(engine_options(settings, log_level=log_level))
    return wanted


def adopt(options: EngineOptions) -> Launched | None:
    """The prelaunched engine process if it was started with these options (it is then no longer prelaunched);
    one started with others is stopped."""
    global _prelaunched
    launched, _prelaunched = _prelaunched, None
    if launched is None or launched.options == options:
        return launched
    log.warning("the engine process started early had other options; starting another")
    kill_if_alive(launched.process)
    for end in (launched.commands, launched.weights, launched.events):
        end.close()
    return None


def prelaunched() -> bool:
    return _prelaunched is not None


def kill_if_alive(process, *, wait_seconds: float = 30.0) -> None:
    """SIGKILL, then wait for its end: its GPU memory is free only once it is gone (a replacement sizes its KV cache
    by the memory free then)."""
    if process.is_alive():
        process.kill()
        process.join(timeout=wait_seconds)
        if process.is_alive():
            log.warning("engine process %s still alive %.0f s after SIGKILL", process.pid, wait_seconds)


def _run_child(options: EngineOptions, commands, weights, events) -> None:
    """The spawn target: the child imports the engine (and torch) itself, in its own process."""
    from server.engine_process.child import main

    main(options, commands, weights, events)
