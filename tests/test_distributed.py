"""Two CPU processes (gloo) train exactly like one process on the same global batch: DDP through
torchrun, and FSDP2 through ``accelerate launch`` with the FSDP config of docs/training.md. A
stream is split between the ranks: every example trained once per pass."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"
STREAM_SCRIPT = Path(__file__).parent / "scripts" / "stream_train.py"
FSDP_ON_CPU = Path(__file__).parent / "scripts" / "fsdp_on_cpu"


def run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", **env}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, failure_report(done)
    return done


def failure_report(done: subprocess.CompletedProcess) -> str:
    """What a failed launch said: every line that names an error or a signal (a rank's cause
    of death comes early, before the launcher's summary), then the ends of both streams."""
    clues = [line for line in (done.stdout + done.stderr).splitlines()
             if any(word in line for word in ("Error", "error:", "Traceback", "Signal", "signal",
                                              "abort", "terminate called", "Fatal"))]
    return "\n".join([f"exit status {done.returncode}", *clues[:40], "--- stdout (end)",
                      done.stdout[-3000:], "--- stderr (end)", done.stderr[-3000:]])


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


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "sft_plugins", "train", "--model_name_or_path", str(model),
            "--dataset", str(data), "--template", "llama-3.1", "--output_dir", str(out),
            "--max_steps", "3", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
            "--report_to", "none", "--use_cpu", "true", "--seed", "7", "--logging_steps", "1",
            "--disable_tqdm", "true", *extra]


def logged_losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


@pytest.mark.slow
def test_fsdp_launch_trains_like_one_process_and_saves_a_whole_model(
        chat_model_dir, chat_data_file, tmp_path):
    """The FSDP2 config of docs/training.md on two gloo ranks (4 examples each) against one
    process (8 examples): same losses, same final weights, saved as a plain model directory
    with the template's tokenizer and stop tokens; the sharded checkpoint resumes; NEFTune's
    hook runs inside the sharded forward."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate installs its launcher"
    config = tmp_path / "fsdp.yaml"
    config.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP",
        "num_processes": 2, "main_process_port": 29541, "use_cpu": True,
        "mixed_precision": "no",
        "fsdp_config": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
                        "fsdp_cpu_ram_efficient_loading": True,
                        "fsdp_activation_checkpointing": True},
    }))

    def launch(out: Path, *extra: str) -> subprocess.CompletedProcess:
        return run([accelerate, "launch", "--config_file", str(config),
                    *train_args(chat_model_dir, chat_data_file, out,
                                "--per_device_train_batch_size", "4", *extra)],
                   tmp_path, PYTHONPATH=os.pathsep.join([str(FSDP_ON_CPU), os.getcwd()]))

    alone, fsdp, resumed, noised = (tmp_path / n for n in ("alone", "fsdp", "resumed", "noised"))
    run([sys.executable, *train_args(chat_model_dir, chat_data_file, alone,
                                     "--per_device_train_batch_size", "8")], tmp_path)
    launch(fsdp, "--save_steps", "2")

    # Every step saw all 8 examples in both runs: the same objective, to float32 rounding.
    assert logged_losses(fsdp) == pytest.approx(logged_losses(alone), rel=1e-5)
    assert len(logged_losses(fsdp)) == 3
    # Checkpoints are FSDP's sharded ones (so FSDP, not DDP, trained); the final save is whole.
    assert (fsdp / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()
    whole, reference = load_file(fsdp / "model.safetensors"), load_file(alone / "model.safetensors")
    assert whole.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(whole[name], value, rtol=1e-4, atol=1e-6, msg=name)
    AutoModelForCausalLM.from_pretrained(fsdp)
    tokenizer = AutoTokenizer.from_pretrained(fsdp)
    assert "<|start_header_id|>" in tokenizer.chat_template
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in GenerationConfig.from_pretrained(
        fsdp).eos_token_id

    launch(resumed, "--resume_from_checkpoint", str(fsdp / "checkpoint-2"))
    # The history of steps 1-2 comes from the checkpoint; step 3 is trained after resuming.
    assert logged_losses(resumed) == pytest.approx(logged_losses(alone), rel=1e-5)

    launch(noised, "--perturber", "neftune", "--perturber_alpha", "50")
    assert logged_losses(noised)[0] != pytest.approx(logged_losses(alone)[0], rel=1e-3)


def test_processes_that_would_train_alone_are_stopped_before_training(
        chat_model_dir, chat_data_file, tmp_path):
    """``accelerate launch --num_processes 2`` on a machine without a GPU and without
    ``--use_cpu``: every process would train a copy of its own on all the data."""
    args = train_args(chat_model_dir, chat_data_file, tmp_path / "out",
                      "--per_device_train_batch_size", "4")
    args[args.index("--use_cpu"):args.index("--use_cpu") + 2] = []
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0"}
    done = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert ("error: this process is one of 2 launched (WORLD_SIZE=2), but the Trainer runs it "
            "alone" in done.stderr)
    assert "--use_cpu true" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "trainer_state.json").exists()


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_sigterm_to_one_rank_saves_on_both_and_the_run_resumes(chat_model_dir, chat_data_file,
                                                               tmp_path):
    """A scheduler that signals one rank only: the ranks agree at the end of the step, save one
    checkpoint together and stop; resuming on two ranks reproduces the uninterrupted losses."""
    import signal
    import time

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    steps = ("--max_steps", "300", "--save_strategy", "no", "--per_device_train_batch_size",
             "2")
    whole, part = tmp_path / "whole", tmp_path / "part"

    def launch(out: Path, port: str, *extra: str) -> list[str]:
        return [torchrun, "--nproc_per_node", "2", "--master_port", port,
                *train_args(chat_model_dir, chat_data_file, out, *steps, *extra)]

    run(launch(whole, "29541"), tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    process = subprocess.Popen(launch(part, "29542"), cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (part / "data_summary.json").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.5)
    workers = sorted(_children(process.pid))
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGTERM)  # one rank only
    output, _ = process.communicate(timeout=120)
    stopped = [int(n) for n in re.findall(r"stopped by SIGTERM after step (\d+)", output)]
    assert stopped, output[-3000:]
    step = stopped[0]
    assert 0 < step < 300
    assert (part / f"checkpoint-{step}" / "sft_plugins_complete.json").is_file()
    assert not (part / "model.safetensors").exists()
    run(launch(part, "29543", "--resume_from_checkpoint", "true"), tmp_path)
    assert logged_losses(part) == pytest.approx(logged_losses(whole), rel=1e-4)


@pytest.mark.slow
def test_ctrl_c_to_torchrun_saves_on_both_ranks(chat_model_dir, chat_data_file, tmp_path):
    """Ctrl-C reaches torchrun alone (its workers run in sessions of their own); it passes
    SIGINT on to every worker and waits --shutdown_timeout seconds: enough for the ranks to
    finish the step and save one checkpoint together."""
    import signal
    import time

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    process = subprocess.Popen(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29544",
         *train_args(chat_model_dir, chat_data_file, out, "--max_steps", "100000",
                     "--save_strategy", "no", "--per_device_train_batch_size", "2")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (out / "data_summary.json").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    stopped = re.findall(r"stopped by Ctrl-C \(SIGINT\) after step (\d+)", output)
    assert len(stopped) == 1, output[-3000:]
    assert (out / f"checkpoint-{stopped[0]}" / "sft_plugins_complete.json").is_file()
    assert "press Ctrl-C again" in output and not (out / "model.safetensors").exists()


def item_file(path: Path, items: range, bad_after: int) -> Path:
    """Conversations naming their item (``item N``), one malformed line after ``bad_after``."""
    lines = []
    for i in items:
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": f"item {i}: sort b a"},
            {"role": "assistant", "content": " ".join(["a b"] * (1 + i % 4))}]}))
        if i == bad_after:
            lines.append("{broken")
    path.write_text("\n".join(lines) + "\n")
    return path


def stream_run(out: Path, batch: int, steps: int, files: list[Path], ranks: int,
               port: str) -> list[dict]:
    out.mkdir()
    launcher = [sys.executable] if ranks == 1 else [
        shutil.which("torchrun", path=str(Path(sys.executable).parent)), "--nproc_per_node",
        str(ranks), "--master_port", port]
    run([*launcher, str(STREAM_SCRIPT), str(out), str(batch), str(steps), *map(str, files)],
        out.parent)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def items_of_pass(ranks: list[dict], number: int) -> list[int]:
    return sorted(item for rank in ranks for n, item in rank["seen"] if n == number)


@pytest.mark.slow
def test_two_ranks_train_each_streamed_example_once_per_pass_like_one_process(tmp_path):
    """One file (one shard) on two ranks: each keeps every other example (datasets'
    ``examples`` split); 9 examples give rank 0 one batch more, which rank 1 matches with a
    zero-weight batch, so both start the second pass together. Each step trains the global
    batch one process trains, so the losses are the same; the malformed line is counted once."""
    data = item_file(tmp_path / "items.jsonl", range(9), bad_after=4)
    [alone] = stream_run(tmp_path / "alone", 4, 5, [data], 1, "")
    ranks = stream_run(tmp_path / "two", 2, 5, [data], 2, "29544")
    assert [r["sharing"] for r in ranks] == ["examples", "examples"]
    assert items_of_pass(ranks, 1) == list(range(9))  # every example once, none twice
    assert items_of_pass(ranks, 2) == list(range(8))  # steps 4-5: the next pass, from its start
    assert {i for _, i in ranks[0]["seen"]} & {i for _, i in ranks[1]["seen"]} == set()
    assert ranks[0]["losses"] == pytest.approx(alone["losses"], rel=1e-5)
    assert ranks[1]["losses"] == ranks[0]["losses"] and len(alone["losses"]) == 5
    summary = json.loads((tmp_path / "two" / "data_summary.json").read_text())["splits"][0]
    assert (summary["examples"], summary["kept"], summary["skipped"]) == \
        (10, 9, {"invalid_json": 1})


@pytest.mark.slow
def test_two_ranks_read_their_own_files_of_a_stream(tmp_path):
    """Two files on two ranks: each rank reads only its own file (``shards``); every example
    once per pass, and the summary adds up both ranks' skips (one malformed line per file)."""
    first = item_file(tmp_path / "a.jsonl", range(5), bad_after=2)
    second = item_file(tmp_path / "b.jsonl", range(5, 12), bad_after=7)
    ranks = stream_run(tmp_path / "two", 2, 6, [first, second], 2, "29545")
    assert [r["sharing"] for r in ranks] == ["shards", "shards"]
    assert items_of_pass(ranks, 1) == list(range(12))
    assert {i for _, i in ranks[0]["seen"]} == set(range(5))
    assert {i for _, i in ranks[1]["seen"]} == set(range(5, 12))
    summary = json.loads((tmp_path / "two" / "data_summary.json").read_text())["splits"][0]
    assert (summary["examples"], summary["kept"], summary["skipped"]) == \
        (14, 12, {"invalid_json": 2})
    assert summary["preparation"]["kept"] == 12
