"""training.accel.end_process_group: in a 2-process launch the main process, which hosts the
launch's store, ends its process group last, and waits only so long for the others."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Rank 1 is slow to end its group; rank 0 must still end after it. Each rank writes when its
# end_process_group returned and whether the group is gone.
SCRIPT = """
import sys, time, warnings
from pathlib import Path
import torch
from accelerate import Accelerator
import training.accel as accel

out, delay, timeout = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
if rank == 1:
    end = accelerator.end_training
    accelerator.end_training = lambda: (time.sleep(delay), end())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import datetime
    accel.end_process_group(accelerator, timeout=datetime.timedelta(seconds=timeout))
(out / f"rank{rank}").write_text(f"{time.time()} {torch.distributed.is_initialized()} {len(caught)}")
"""


def launch(tmp_path: Path, delay: float, timeout: float) -> list[list[str]]:
    script = tmp_path / "end_group.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(script), str(tmp_path), str(delay), str(timeout)]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [(tmp_path / f"rank{r}").read_text().split() for r in (0, 1)]


def test_main_process_ends_its_group_last(tmp_path):
    (t0, left0, warned0), (t1, left1, _) = launch(tmp_path, delay=2.0, timeout=60)
    assert float(t0) >= float(t1)  # without the ordering rank 0 is done ~2 s before rank 1
    assert (left0, left1, warned0) == ("False", "False", "0")


def test_main_process_waits_only_until_the_timeout(tmp_path):
    (t0, left0, warned0), (t1, left1, _) = launch(tmp_path, delay=4.0, timeout=0.5)
    assert float(t0) < float(t1)
    assert (left0, left1, warned0) == ("False", "False", "1")
