"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (what cluster schedulers send before pre-emption).

    with StopSignals(announce=accelerator.is_main_process) as signals:
        for each step:
            ...
            if signals.agreed(accelerator):   # any process signalled: all stop after this step
                save a checkpoint; raise TrainingInterrupted(...)

The first signal only sets a flag; the loop finishes the step it is in, writes a checkpoint and
raises ``TrainingInterrupted``, which the CLIs turn into one line naming the resume command and exit
code 128 + signal (130 for SIGINT, 143 for SIGTERM). A second signal aborts at once (exit code
128 + signal, no checkpoint; the previous checkpoint is intact because checkpoints are written
atomically). Under ``accelerate launch`` a Ctrl-C reaches every process twice (from the terminal and
again from torchrun's agent, which forwards the signal it got), so a repeat within
``REPEAT_WINDOW_S`` counts as the same signal. torchrun kills its workers 30 s after forwarding a
signal, which bounds the time a step plus a checkpoint may take under a launcher.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_WINDOW_S = 1.0


class TrainingInterrupted(Exception):
    """Training stopped on a signal after writing ``checkpoint`` at ``step``."""

    def __init__(self, signum: int, step: int, checkpoint: Any):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Context manager: SIGINT/SIGTERM request a stop at the next step boundary; a second one aborts.

    Handlers can only be installed from the main thread; elsewhere this does nothing (signals keep
    their previous behaviour) and ``requested`` stays None.
    """

    def __init__(self, announce: bool = True):
        self.announce = announce
        self.requested: Optional[int] = None  # the signal number of the first signal
        self._first_at = 0.0
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested, self._first_at = signum, time.monotonic()
            if self.announce:
                print(f"\n{name}: stopping after this step and writing a checkpoint "
                      "(send it again to abort at once)", file=sys.stderr, flush=True)
            return
        if time.monotonic() - self._first_at < REPEAT_WINDOW_S:
            return  # the launcher forwarding the same Ctrl-C
        if self.announce:
            print(f"\n{name} again: aborting now without a checkpoint (the last complete one is kept)",
                  file=sys.stderr, flush=True)
        os._exit(128 + signum)  # at once: no cleanup that could block on other processes

    def agreed(self, accelerator: Any) -> bool:
        """True on every process when any process has been signalled (one all-reduce under DDP)."""
        if accelerator.num_processes == 1:
            return self.requested is not None  # no collective, no device sync
        if self.requested is not None:
            accelerator.set_trigger()
        return accelerator.check_trigger()


def resume_command(command: str, run_dir: Any) -> str:
    """The command that continues ``run_dir`` (the launcher's own line when under ``accelerate launch``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or "ACCELERATE_MIXED_PRECISION" in os.environ:
        return f"accelerate launch <same options> -m hooked_bilinear.cli {command} --resume --out {run_dir}"
    return f"hooked-bilinear {command} --resume --out {run_dir}"


def interrupted_message(command: str, stop: "TrainingInterrupted", run_dir: Any) -> str:
    return (f"hooked-bilinear {command}: stopped by {signal.Signals(stop.signum).name} at step {stop.step}; "
            f"checkpoint {stop.checkpoint}. Resume with: {resume_command(command, run_dir)}")


def report_stop(command: str, stop: BaseException, run_dir: Any) -> int:
    """One line on the main process for a run that a signal stopped, and the exit code: the
    signal's (130/143) after a checkpoint, 130 for Ctrl-C outside the training steps."""
    main_process = int(os.environ.get("RANK", "0")) == 0
    if isinstance(stop, TrainingInterrupted):
        if main_process:
            print(interrupted_message(command, stop, run_dir), file=sys.stderr)
        return stop.exit_code
    if main_process:  # KeyboardInterrupt during data preparation or the final save: no traceback
        print(f"\nhooked-bilinear {command}: interrupted outside the training steps; complete checkpoints "
              "(if any) are kept", file=sys.stderr)
    return 130

