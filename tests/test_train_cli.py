"""``sft-plugins train`` end to end on a tiny model: flags, config files, errors, resuming."""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from sft_plugins.cli import main
from sft_plugins.commands.chat import load_for_chat


def base_args(chat_model_dir, chat_data_file, out, *extra):
    return ["train", "--model_name_or_path", str(chat_model_dir), "--dataset", str(chat_data_file),
            "--template", "llama-3.1", "--output_dir", str(out), "--max_steps", "4",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--report_to",
            "none", "--use_cpu", "true", "--seed", "7", "--logging_steps", "1",
            "--disable_tqdm", "true", *extra]


def invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def losses(out):
    state = json.loads((out / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def test_trains_saves_model_tokenizer_and_report(chat_model_dir, chat_data_file, tmp_path):
    out = tmp_path / "run"
    result = invoke(base_args(chat_model_dir, chat_data_file, out, "--perturber", "neftune",
                              "--perturber_alpha", "5", "--template_omit_knowledge_date",
                              "true"))
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").exists()
    saved = AutoTokenizer.from_pretrained(out)
    assert "<|start_header_id|>" in saved.chat_template
    assert saved.pad_token == "<|finetune_right_pad_id|>"
    summary = json.loads((out / "data_summary.json").read_text())
    assert summary["splits"][0]["preparation"]["kept"] == 8
    assert len(losses(out)) == 4
    assert "completion-only" in result.output and "neftune" in result.output


def test_config_file_and_command_line_override(chat_model_dir, chat_data_file, tmp_path):
    out = tmp_path / "cfg"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(chat_model_dir), "dataset": [str(chat_data_file)],
        "template": "llama-3.1", "output_dir": str(out), "max_steps": 10,
        "per_device_train_batch_size": 4, "report_to": "none", "use_cpu": True,
        "disable_tqdm": True, "collator": "prompt-weighted",
        "collator_prompt_loss_weight": 0.05,
    }))
    result = invoke(["train", "--config", str(config), "--max_steps", "2"])
    assert result.exit_code == 0, result.output
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert "prompt-weighted" in result.output


def test_resuming_draws_the_same_noise_and_losses(chat_model_dir, chat_data_file, tmp_path):
    """Two steps, then two more resumed from the checkpoint, equal four uninterrupted steps
    (a constant learning rate, since the first part is told max_steps=2)."""
    noisy = ("--perturber", "neftune", "--perturber_alpha", "10", "--save_strategy", "steps",
             "--save_steps", "2", "--lr_scheduler_type", "constant")
    whole = tmp_path / "whole"
    assert invoke(base_args(chat_model_dir, chat_data_file, whole, *noisy)).exit_code == 0
    part = tmp_path / "part"
    assert invoke(base_args(chat_model_dir, chat_data_file, part, *noisy, "--max_steps", "2")
                  ).exit_code == 0
    resumed = invoke(base_args(chat_model_dir, chat_data_file, part, *noisy,
                               "--resume_from_checkpoint", str(part / "checkpoint-2")))
    assert resumed.exit_code == 0, resumed.output
    assert losses(part)[-2:] == pytest.approx(losses(whole)[-2:], rel=1e-5)


@pytest.mark.parametrize(("extra", "message"), [
    (["--perturber", "neftune", "--perturber_alpha", "-1"], "alpha"),
    (["--perturber", "neftun"], "Did you mean 'neftune'"),
    (["--perturber_alpha", "3"], "without --perturber"),
    (["--collator_no_such_option", "1"], "no_such_option"),
    (["--load_in_4bit", "true", "--load_in_8bit", "true", "--use_lora", "true"],
     "exclude each other"),
    (["--no_such_flag", "1"], "unknown flag '--no_such_flag'"),
    (["--template", "qwen2.5"], "special tokens the tokenizer does not have"),
    (["--packing", "true"], "--packing needs --max_length"),
])
def test_bad_flags_fail_before_training_with_one_clear_error(chat_model_dir, chat_data_file,
                                                             tmp_path, extra, message):
    args = base_args(chat_model_dir, chat_data_file, tmp_path / "bad", *extra)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "bad" / "model.safetensors").exists()


def test_errors_are_printed_verbatim_brackets_included(chat_model_dir, chat_data_file,
                                                       tmp_path, monkeypatch):
    """The install hint names the extra in brackets, which terminal markup would swallow."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # find_spec: not installed
    args = base_args(chat_model_dir, chat_data_file, tmp_path / "q", "--load_in_4bit", "true",
                     "--use_lora", "true")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert ("--load_in_4bit needs bitsandbytes, which is not installed: "
            "pip install 'sft-plugins[qlora]'") in result.output


def test_a_tokenizer_the_model_cannot_embed_is_refused_before_training(
        chat_model_dir, chat_data_file, tmp_path):
    """A model of 300 embedding rows given the 2 304-token tokenizer: one error naming the
    example and the token, instead of an index error at the first step."""
    small = tmp_path / "small"
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1)).save_pretrained(small)
    args = base_args(small, chat_data_file, tmp_path / "out", "--tokenizer_name_or_path",
                     str(chat_model_dir))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert re.search(r"train example 0 has token id \d+, but the model's input embedding has "
                     r"300 rows: the tokenizer is not this model's", result.output)
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "trainer_state.json").exists()


def test_tokenizer_without_template_needs_one(chat_model_dir, chat_data_file, tmp_path):
    args = base_args(chat_model_dir, chat_data_file, tmp_path / "nt")
    at = args.index("--template")
    del args[at:at + 2]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "has no chat template" in result.output


def test_help_lists_training_arguments():
    result = invoke(["train", "--help"])
    assert result.exit_code == 0
    for flag in ("--model_name_or_path", "--learning_rate", "--perturber", "--dataset"):
        assert flag in result.output


def test_one_bad_line_among_ten_thousand(chat_model_dir, tmp_path):
    """error: stops before training naming the line; skip: trains on the 10 000, reports 1."""
    data = tmp_path / "big.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "Sort the letters: b a"},
                                    {"role": "assistant", "content": "a b"}]})
    bad = json.dumps({"messages": [{"role": "user", "content": "Sort the letters: b a"}]})
    data.write_text("\n".join([good] * 5000 + [bad] + [good] * 5000) + "\n")

    stopped = CliRunner().invoke(main, base_args(chat_model_dir, data, tmp_path / "err",
                                                 "--max_steps", "1"))
    assert stopped.exit_code == 2
    assert "big.jsonl:5001" in stopped.output
    assert not (tmp_path / "err" / "model.safetensors").exists()

    out = tmp_path / "skip"
    skipped = invoke(base_args(chat_model_dir, data, out, "--max_steps", "1",
                               "--on_bad_example", "skip"))
    assert skipped.exit_code == 0, skipped.output[-2000:]
    summary = json.loads((out / "data_summary.json").read_text())
    assert summary["splits"][0]["preparation"]["kept"] == 10_000
    assert json.dumps(summary).count("5001") >= 1
    assert (out / "model.safetensors").exists()


def test_packing_flag_packs_rows(chat_model_dir, chat_data_file, tmp_path):
    out = tmp_path / "packed"
    result = invoke(base_args(chat_model_dir, chat_data_file, out, "--packing", "true",
                              "--max_length", "256", "--max_steps", "1",
                              "--per_device_train_batch_size", "1"))
    assert result.exit_code == 0, result.output[-2000:]
    rows = re.search(r"packed rows\s*│\s*(\d+)", result.output)
    assert rows and 1 < int(rows.group(1)) < 8, result.output[-1500:]
    assert (out / "model.safetensors").exists()


def test_lora_adapter_is_saved_with_the_templates_stop_tokens(chat_model_dir, chat_data_file,
                                                              tmp_path):
    """A base model that stops only at <|end_of_text|> (as Llama 3.1 base does): the adapter
    directory must carry the template's stop tokens, or generation runs past <|eot_id|>."""
    base = tmp_path / "base"
    model = LlamaForCausalLM.from_pretrained(chat_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    end_of_text = tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    end_of_turn = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    model.generation_config.eos_token_id = end_of_text
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    out = tmp_path / "adapter"
    result = invoke(base_args(base, chat_data_file, out, "--use_lora", "true", "--lora_r", "4",
                              "--max_steps", "1"))
    assert result.exit_code == 0, result.output
    assert (out / "adapter_model.safetensors").exists()
    assert end_of_turn in GenerationConfig.from_pretrained(out).eos_token_id
    _, loaded = load_for_chat(out)
    assert end_of_turn in loaded.generation_config.eos_token_id
    assert GenerationConfig.from_pretrained(base).eos_token_id == end_of_text


@pytest.mark.parametrize(("extra", "flag"), [
    (["--num_train_epochs", "0", "--max_steps", "-1"], "--num_train_epochs"),
    (["--max_steps", "0"], "--max_steps"),
    (["--save_steps", "-1"], "--save_steps"),
    (["--save_steps", "0"], "--save_steps"),
    (["--logging_steps", "0"], "--logging_steps"),
    (["--learning_rate", "-0.001"], "--learning_rate"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
    (["--logits_chunk_size", "0"], "--logits_chunk_size"),
    (["--max_length", "0"], "--max_length"),
    (["--report_to", "nosuchtool"], "--report_to nosuchtool"),
    (["--warmup_steps", "-1"], "warmup_steps"),
    (["--learning_rat", "0.1"], "--learning_rat"),
    (["--max_steps", "four"], "--max_steps"),
    (["--bf16", "maybe"], "--bf16"),
    (["--learning_rate", "nan"], "--learning_rate nan: not a number"),
    (["--learning_rate", "inf"], "--learning_rate inf: the first step"),
    (["--weight_decay", "nan"], "--weight_decay nan: not a number"),
    (["--lora_dropout", "NaN"], "--lora_dropout nan: not a number"),
    (["--collator", "completion-only", "--collator_max_length", "abc"],
     "--collator_max_length: 'abc' is not an integer"),
    (["--perturber", "neftune", "--perturber_alpha", "x"],
     "--perturber_alpha: 'x' is not a number"),
    (["--collator", "nope"], "unknown collator 'nope'"),
    (["--perturber", "nope"], "unknown perturber 'nope'"),
])
def test_bad_training_flags_are_one_line_before_anything_loads(tmp_path, extra, flag):
    """The model directory does not exist: the flag is refused before it is looked for."""
    out = tmp_path / "out"
    args = ["train", "--model_name_or_path", str(tmp_path / "no-model"), "--dataset",
            str(tmp_path / "no-data.jsonl"), "--output_dir", str(out), *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], lines
    assert not out.exists()


def test_a_config_key_is_never_abbreviated(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rat: 0.1\n")
    result = CliRunner().invoke(main, ["train", "--config", str(config), "--model_name_or_path",
                                       "m", "--dataset", "d.jsonl", "--output_dir", "o"])
    assert result.exit_code == 2 and "--learning_rat" in result.output


@pytest.mark.parametrize(("name", "text", "extra", "expected"), [
    ("run.yaml", "learning_rate: fast\n", [],
     "error: {path}: argument --learning_rate/--learning-rate: invalid float value: 'fast'"),
    ("run.yml", "learning-rat: 0.1\n", [], "error: {path}: unknown flag '--learning-rat'"),
    ("run.json", '{"max_steps": -5}', [], "error: {path}: --max_steps -5: give a positive"),
    ("run.yaml", "max_steps: -5\n", ["--max_steps", "-7"], "error: --max_steps -7: give a"),
    ("run.yaml", "learning_rate: nan\n", [], "error: {path}: --learning_rate nan: not a number"),
    ("run.yaml", b"\xff\xfemax_steps: 1\n", [],
     "error: config file '{path}' is not UTF-8 text (invalid start byte at byte 0)"),
    ("run.txt", "max_steps: 1\n", [], "error: unexpected argument '{path}': flags start with"),
])
def test_an_error_from_a_config_file_names_it(tmp_path, name, text, extra, expected):
    """The flag at fault was set in the file (the first argument, as the Hugging Face example
    scripts take it): the error says so; set on the command line too, the command line's value
    is the one refused, and named as such."""
    config = tmp_path / name
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["train", str(config), "--model_name_or_path",
                                       str(tmp_path / "no-model"), "--dataset", "d.jsonl",
                                       "--output_dir", str(out), *extra])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith(expected.format(path=config)), lines
    assert not out.exists()


def test_a_config_file_as_the_first_argument_is_read_like_config(tmp_path):
    from sft_plugins.commands.train import parse

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": "m", "dataset": ["a.jsonl"],
                                      "output_dir": str(tmp_path / "out"), "max_steps": 10,
                                      "collator_prompt_loss_weight": 0.05}))
    first = parse([str(config), "--max_steps", "2"])
    flag = parse(["--max_steps", "2", "--config", str(config)])
    for parsed in (first, flag):
        model, data, _, training, options = parsed
        assert (model.model_name_or_path, data.dataset, training.max_steps) == \
            ("m", ["a.jsonl"], 2)
        assert options["collator"] == {"prompt_loss_weight": "0.05"}


# ------------------------------------------------------------------------- checkpoints -----

SAVING = ("--save_strategy", "steps", "--save_steps", "2", "--lr_scheduler_type", "constant")


@pytest.fixture
def finished_run(chat_model_dir, chat_data_file, tmp_path):
    out = tmp_path / "run"
    result = invoke(base_args(chat_model_dir, chat_data_file, out, *SAVING))
    assert result.exit_code == 0, result.output
    assert (out / "checkpoint-4" / "sft_plugins_complete.json").is_file()
    return out


def resume(chat_model_dir, chat_data_file, out, checkpoint, *extra):
    return CliRunner().invoke(main, base_args(chat_model_dir, chat_data_file, out, *SAVING,
                                              "--resume_from_checkpoint", checkpoint, *extra))


def test_resuming_a_finished_run_trains_nothing_and_says_so(chat_model_dir, chat_data_file,
                                                           finished_run):
    weights = (finished_run / "model.safetensors").read_bytes()
    result = resume(chat_model_dir, chat_data_file, finished_run, "true")
    assert result.exit_code == 0, result.output
    assert "nothing to train" in result.output
    assert json.loads((finished_run / "trainer_state.json").read_text())["global_step"] == 4
    assert (finished_run / "model.safetensors").read_bytes() == weights
    assert not (finished_run / "checkpoint-5").exists()


@pytest.mark.parametrize("lost", ["optimizer.pt", "rng_state.pth", "sft_plugins_complete.json"])
def test_a_checkpoint_without_its_training_state_is_refused_unless_accepted(
        chat_model_dir, chat_data_file, finished_run, lost):
    checkpoint = finished_run / "checkpoint-2"
    (checkpoint / lost).unlink()
    result = resume(chat_model_dir, chat_data_file, finished_run, str(checkpoint))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --resume_from_checkpoint "), lines
    assert (lost.split(".")[0] in lines[0] or "not marked complete" in lines[0])
    assert "--resume_incomplete true" in lines[0]
    accepted = resume(chat_model_dir, chat_data_file, finished_run, str(checkpoint),
                      "--resume_incomplete", "true")
    assert accepted.exit_code == 0, accepted.output
    assert json.loads((finished_run / "trainer_state.json").read_text())["global_step"] == 4


def test_true_resumes_from_the_newest_complete_checkpoint(chat_model_dir, chat_data_file,
                                                          finished_run, caplog):
    """A process killed while writing checkpoint-4 leaves it unmarked (or a file shorter than
    recorded): resuming passes it over, names it and why, and continues from checkpoint-2."""
    whole = losses(finished_run)
    (finished_run / "checkpoint-4" / "optimizer.pt").write_bytes(b"half")
    result = resume(chat_model_dir, chat_data_file, finished_run, "true")
    assert result.exit_code == 0, result.output
    assert "not resuming from" in caplog.text and "checkpoint-4" in caplog.text
    assert "optimizer.pt has 4 bytes" in caplog.text
    assert losses(finished_run)[-2:] == pytest.approx(whole[-2:], rel=1e-5)


@pytest.mark.parametrize("checkpoint", ["true", "no-such-dir"])
def test_nothing_to_resume_from_is_one_line(chat_model_dir, chat_data_file, tmp_path,
                                            checkpoint):
    result = resume(chat_model_dir, chat_data_file, tmp_path / "fresh", checkpoint)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --resume_from_checkpoint"), lines


def start_training(args):
    """``sft-plugins <args>`` in a process of its own, once it has started training (its data
    summary is written just before the first step)."""
    import os
    import subprocess
    import time

    process = subprocess.Popen([sys.executable, "-m", "sft_plugins", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = Path(args[args.index("--output_dir") + 1])
    deadline = time.monotonic() + 120
    while not (out / "data_summary.json").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)
    return process


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status", "named"), [
    (signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, r"Ctrl-C \(SIGINT\)")])
def test_a_stop_signal_saves_a_checkpoint_and_the_run_resumes_where_it_stopped(
        chat_model_dir, chat_data_file, tmp_path, signum, status, named):
    """What a scheduler's preemption (SIGTERM) or a first Ctrl-C does mid-training. The run
    saves a checkpoint at the end of the step (though --save_strategy is no), says so, exits
    143 or 130 without writing a final model, and resuming gives the uninterrupted run's
    losses."""
    steps = ("--max_steps", "300", "--per_device_train_batch_size", "2", "--save_strategy",
             "no", "--lr_scheduler_type", "constant", "--perturber", "neftune")
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert invoke(base_args(chat_model_dir, chat_data_file, whole, *steps)).exit_code == 0
    process = start_training(base_args(chat_model_dir, chat_data_file, part, *steps))
    process.send_signal(signum)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == status, output[-2000:]
    stopped = re.search(rf"stopped by {named} after step (\d+): checkpoint-\1 is saved", output)
    assert stopped, output[-2000:]
    assert ("press Ctrl-C again to stop at once" in output) == (signum == signal.SIGINT)
    step = int(stopped.group(1))
    assert 0 < step < 300
    assert (part / f"checkpoint-{step}" / "sft_plugins_complete.json").is_file()
    assert not (part / "model.safetensors").exists()
    resumed = invoke(base_args(chat_model_dir, chat_data_file, part, *steps,
                               "--resume_from_checkpoint", "true"))
    assert resumed.exit_code == 0, resumed.output
    assert losses(part) == pytest.approx(losses(whole), rel=1e-5)


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_without_saving(chat_model_dir, chat_data_file, tmp_path):
    """Whoever cannot wait for the step and the save presses Ctrl-C again: the run stops
    there, as Ctrl-C always did, and saves nothing."""
    out = tmp_path / "run"
    process = start_training(base_args(chat_model_dir, chat_data_file, out, "--max_steps",
                                       "100000", "--save_strategy", "no"))
    process.send_signal(signal.SIGINT)
    said = ""
    while "press Ctrl-C again" not in said:
        line = process.stdout.readline()
        assert line, said[-2000:]
        said += line
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, said + output
    assert output.strip().endswith("interrupted") and "stopped by" not in output
    assert "Traceback" not in output
    assert not list(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_reaches_the_dataloader_workers_and_is_said_once(
        chat_model_dir, chat_data_file, tmp_path):
    """A terminal sends Ctrl-C to the whole foreground process group, the DataLoader's forked
    workers included: they leave the stop to the training process, which saves once and says
    so once."""
    import os
    import subprocess

    rows = chat_data_file.read_text(encoding="utf-8")
    data = tmp_path / "many.jsonl"
    data.write_text(rows * 100, encoding="utf-8")  # workers that live through the signal
    out = tmp_path / "run"
    args = base_args(chat_model_dir, data, out, "--max_steps", "100000", "--save_strategy",
                     "no", "--dataloader_num_workers", "2")
    process = subprocess.Popen([sys.executable, "-m", "sft_plugins", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               start_new_session=True)
    said = ""
    while "'loss'" not in said:  # the workers are running once a step has been logged
        line = process.stdout.readline()
        assert line, said[-2000:]
        said += line
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    output = said + output
    assert process.returncode == 130, output[-2000:]
    assert output.count("interrupted: saving a checkpoint") == 1, output[-2000:]
    stopped = re.search(r"stopped by Ctrl-C \(SIGINT\) after step (\d+)", output)
    assert stopped, output[-2000:]
    assert (out / f"checkpoint-{stopped.group(1)}" / "sft_plugins_complete.json").is_file()


@pytest.mark.parametrize("fails", [False, True])
def test_the_command_ends_the_process_group_it_trained_in(chat_model_dir, chat_data_file,
                                                          tmp_path, monkeypatch, fails):
    """A launched rank destroys its process group before the interpreter's teardown (where
    gloo's threads can abort a rank that trained and saved everything), also after an error."""
    import torch.distributed as dist

    import sft_plugins.training
    from sft_plugins.errors import ConfigError

    train = sft_plugins.training.train_from_arguments

    def in_a_group(*args, **kwargs):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                                world_size=1)
        if fails:
            raise ConfigError("a failure after the group was up")
        return train(*args, **kwargs)

    monkeypatch.setattr(sft_plugins.training, "train_from_arguments", in_a_group)
    try:
        result = invoke(base_args(chat_model_dir, chat_data_file, tmp_path / "run",
                                  "--max_steps", "1"))
        assert result.exit_code == (2 if fails else 0), result.output
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_the_command_frees_the_trained_model_before_it_ends_the_process_group(
        chat_model_dir, chat_data_file, tmp_path, monkeypatch):
    """Freed only in the interpreter's teardown, after the group, the wrapped model can make a
    gloo thread reach back into Python and abort a rank that trained and saved everything."""
    import weakref

    import torch.distributed as dist

    import sft_plugins.training

    train, destroy = sft_plugins.training.train_from_arguments, dist.destroy_process_group
    seen: dict[str, object] = {}

    def in_a_group(*args, **kwargs):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                                world_size=1)
        outcome = train(*args, **kwargs)
        seen["model"] = weakref.ref(outcome.trainer.model)
        seen["trainer"] = weakref.ref(outcome.trainer)
        return outcome

    def destroying(*args, **kwargs):
        seen["alive when the group ends"] = [name for name in ("model", "trainer")
                                             if seen[name]()]
        destroy(*args, **kwargs)

    monkeypatch.setattr(sft_plugins.training, "train_from_arguments", in_a_group)
    monkeypatch.setattr(dist, "destroy_process_group", destroying)
    try:
        result = invoke(base_args(chat_model_dir, chat_data_file, tmp_path / "run",
                                  "--max_steps", "1"))
        assert result.exit_code == 0, result.output
        assert seen["alive when the group ends"] == []
    finally:
        if dist.is_initialized():
            destroy()


INSPECT = """
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("STATE " + json.dumps({p.name: sorted(c.name for c in p.iterdir()) if p.is_dir() else None
                             for p in out.iterdir()}))
"""


@pytest.mark.slow
def test_a_full_disk_while_saving_is_one_line_and_leaves_the_previous_checkpoint(
        chat_model_dir, chat_data_file, tmp_path, on_small_disk):
    """--output_dir on a tmpfs with room for one checkpoint and a half: the second save fails
    for space. One error line naming the directory and the bytes, exit 2, the partial
    checkpoint-2 removed, checkpoint-1 complete."""
    saving = ("--save_strategy", "steps", "--save_steps", "1", "--max_steps", "3")
    sized = tmp_path / "sized"
    assert invoke(base_args(chat_model_dir, chat_data_file, sized, *saving,
                            "--max_steps", "1")).exit_code == 0
    one = sum(p.stat().st_size for p in (sized / "checkpoint-1").rglob("*") if p.is_file())
    out = tmp_path / "small-disk"
    out.mkdir()
    train = " ".join(f"'{a}'" for a in [sys.executable, "-m", "sft_plugins",
                                         *base_args(chat_model_dir, chat_data_file, out,
                                                    *saving)])
    inspect = f"'{sys.executable}' -c '{INSPECT}' '{out}'"
    result = on_small_disk(out, int(one * 1.5), f"{train}; echo EXIT $?; {inspect}")
    output = result.stdout + result.stderr
    assert "EXIT 2" in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in output, output[-3000:]
    assert f"no space left on the device of {out} while saving checkpoint-2" in errors[0]
    assert "bytes" in errors[0] and "checkpoint-1 is intact" in errors[0]
    state = json.loads(next(line for line in output.splitlines()
                            if line.startswith("STATE "))[6:])
    assert "checkpoint-2" not in state and "model.safetensors" not in state
    assert "sft_plugins_complete.json" in state["checkpoint-1"]


def test_an_output_dir_that_is_a_file_is_refused_before_loading(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    result = CliRunner().invoke(main, ["train", "--model_name_or_path", str(tmp_path / "none"),
                                       "--dataset", "d.jsonl", "--output_dir", str(target)])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: --output_dir {target} is a file; give a directory"
    assert target.read_text() == "keep me"


def test_a_run_that_fails_before_training_leaves_an_earlier_run_as_it_was(
        chat_model_dir, chat_data_file, tmp_path):
    out = tmp_path / "run"
    first = invoke(base_args(chat_model_dir, chat_data_file, out, "--on_bad_example", "skip"))
    assert first.exit_code == 0, first.output
    def files():
        return {p.name: (p.read_bytes(), p.stat().st_mtime_ns)
                for p in out.iterdir() if p.is_file()}

    before = files()
    assert {"data_summary.json", "model.safetensors"} <= set(before)
    import shutil

    broken = tmp_path / "broken-model"  # its weights fail to load, after the data is read
    shutil.copytree(chat_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    failed = CliRunner().invoke(main, base_args(broken, chat_data_file, out,
                                                "--on_bad_example", "skip"))
    assert failed.exit_code == 2 and "weights cannot be read" in failed.output, failed.output
    assert files() == before


def test_a_failed_upload_after_training_says_the_model_is_saved(chat_model_dir, chat_data_file,
                                                                tmp_path, monkeypatch):
    """--push_to_hub: the repository is created, training and the local save succeed, and the
    upload fails (the network went away): one line saying where the model is and how to upload
    it, not a traceback that reads like a failed run."""
    import types
    from concurrent.futures import Future

    import transformers.trainer

    def upload_folder(run_as_future=False, **kwargs):
        error = ConnectionError("the network went away")
        if not run_as_future:
            raise error
        failed = Future()  # the checkpoint uploads, in the background, fail in silence
        failed.set_exception(error)
        return failed

    hub = types.SimpleNamespace(
        create_repo=lambda name, **kwargs: types.SimpleNamespace(repo_id=f"me/{name}"),
        upload_folder=upload_folder)
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, base_args(chat_model_dir, chat_data_file, out,
                                                "--push_to_hub", "true"))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [  # stdout and stderr interleave in the runner's output: not always last
        f"error: the model is saved in {out}, but pushing it to 'me/run' failed "
        f"(ConnectionError: the network went away); upload it with: hf upload me/run {out}"]
    assert "Traceback" not in result.output
    assert (out / "model.safetensors").is_file()
