"""Two CPU processes (torchrun, gloo) train exactly like one process on the same global batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"


def run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_two_ranks_match_one_process_and_each_other(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun comes with torch"
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    run([sys.executable, str(SCRIPT), str(single)], tmp_path)
    run([torchrun, "--nproc_per_node", "2", "--master_port", "29533", str(SCRIPT), str(ddp)],
        tmp_path)
    alone = torch.load(single / "rank0.pt")
    rank0, rank1 = torch.load(ddp / "rank0.pt"), torch.load(ddp / "rank1.pt")
    assert len(alone["losses"]) == 3
    # Same global objective, different reduction order: float32 tolerance.
    assert rank0["losses"] == pytest.approx(alone["losses"], rel=1e-4)
    for name, value in alone["weights"].items():
        assert torch.equal(rank0["weights"][name], rank1["weights"][name]), name
        torch.testing.assert_close(rank0["weights"][name], value, rtol=1e-4, atol=1e-5,
                                   msg=name)
