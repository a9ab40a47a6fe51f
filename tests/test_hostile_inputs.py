"""The command line against hostile input: malformed data files, bad flags and config files,
templates that raise, broken model directories and broken plugins.

Every case must end the way a user error should: exit status 2, exactly one line starting with
``error:`` that names the place (the file, flag, template or plugin), no Python traceback, and
nothing written to the output directory. The cases are generated from small lists crossed with
the commands that read them; ``test_there_are_at_least_200_cases`` keeps the count honest.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
from sft_plugins.cli import main

GOOD = {"messages": [{"role": "user", "content": "Sort: b a"},
                     {"role": "assistant", "content": "a b"}]}


def _line(value: object) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


# name -> (file name, bytes, text the error must contain)
DATA: dict[str, tuple[str, bytes, str]] = {}


def _data(name: str, filename: str, content: bytes, names: str | None = None) -> None:
    DATA[name] = (filename, content, names or filename)


def _lines(name: str, bad: object, names: str = ":2") -> None:
    _data(name, f"{name}.jsonl", _line(GOOD) + b"\n" + _line(bad) + b"\n", names)


for _name, _bad in {
    "bad-utf8": b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
    "lone-surrogate": b'{"messages": [{"role": "user", "content": "\\ud800"}, '
                      b'{"role": "assistant", "content": "x"}]}',
    "deep-nesting": b"[" * 5000 + b"]" * 5000,
    "deep-object": b'{"a":' * 3000 + b"1" + b"}" * 3000,
    "duplicate-key": b'{"messages": [], "messages": []}',
    "duplicate-nested-key": b'{"messages": [{"role": "user", "role": "assistant", '
                            b'"content": "x"}]}',
    "truncated-json": b'{"messages": [{"role": "user"',
    "json-list": b"[1, 2, 3]",
    "json-string": b'"hello"',
    "json-number": b"42",
    "json-null": b"null",
    "nan": b'{"messages": NaN}',
    "messages-not-list": {"messages": "hello"},
    "messages-empty": {"messages": []},
    "message-not-object": {"messages": ["hi", "there"]},
    "role-missing": {"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]},
    "role-unknown": {"messages": [{"role": "wizard", "content": "x"},
                                  {"role": "assistant", "content": "y"}]},
    "role-number": {"messages": [{"role": 7, "content": "x"},
                                 {"role": "assistant", "content": "y"}]},
    "content-number": {"messages": [{"role": "user", "content": 5},
                                    {"role": "assistant", "content": "y"}]},
    "content-object": {"messages": [{"role": "user", "content": {"a": 1}},
                                    {"role": "assistant", "content": "y"}]},
    "no-assistant": {"messages": [{"role": "user", "content": "x"}]},
    "tool-calls-not-list": {"messages": [{"role": "user", "content": "x"},
                                         {"role": "assistant", "tool_calls": "call"}]},
    "unknown-format": {"question": "x", "answer": "y"},
    "prompt-number": {"prompt": 3, "completion": "y"},
}.items():
    _lines(_name, _bad)

_data("utf16", "utf16.jsonl", (json.dumps(GOOD) + "\n").encode("utf-16"), "UTF-16")
_data("utf32", "utf32.jsonl", (json.dumps(GOOD) + "\n").encode("utf-32"), "UTF-32")
_data("binary", "binary.jsonl", bytes(range(256)) * 4, "binary.jsonl")
_data("empty", "empty.jsonl", b"", "empty.jsonl")
_data("blank-lines", "blank.jsonl", b"\n \n\t\n", "blank.jsonl")
_data("deep-array-file", "deep.json", b"[" * 5000 + b"]" * 5000, "deep.json")
_data("array-of-numbers", "numbers.json", b"[1, 2, 3]", "numbers.json")
_data("empty-array", "nothing.json", b"[]", "nothing.json")
_data("top-level-object", "object.json", b'{"a": 1}\n{"a": [}', "object.json")
_data("bad-gzip", "bad.jsonl.gz", b"\x1f\x8b not gzip", "bad.jsonl.gz")
_data("truncated-gzip", "cut.jsonl.gz", gzip.compress(_line(GOOD) * 50)[:40], "cut.jsonl.gz")
_data("bad-parquet", "bad.parquet", b"PAR1 not parquet", "bad.parquet")
_data("csv-bad-utf8", "bad.csv", b"prompt,completion\n\xff\xfe,x\n", "bad.csv")
_data("csv-header-only", "header.csv", b"prompt,completion\n", "header.csv")
_data("csv-wrong-columns", "cols.csv", b"a,b\n1,2\n", "cols.csv")
_data("unknown-suffix", "data.txt", _line(GOOD), "data.txt")

DATA_COMMANDS = ("check-data", "check-data-skip", "train", "train-skip")
RENDERABLE = {"no-assistant", "unknown-suffix", "unknown-format", "prompt-number"}
"""Rows ``render`` shows as they are (it renders any file of conversations, or says which line
holds no ``messages`` list)."""


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]
    names: str
    """Text the error line must contain: the file, flag, template or plugin at fault."""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Files, tokenizer and model directories the cases point at."""
    root = tmp_path_factory.mktemp("hostile")
    for filename, content, _ in DATA.values():
        (root / filename).write_bytes(content)
    (root / "ok.jsonl").write_bytes(_line(GOOD) + b"\n")
    (root / "a-directory.jsonl").mkdir()
    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    tokenizer.pad_token = "<|finetune_right_pad_id|>"  # the template, not the pad, is at fault
    for name, template in TEMPLATES.items():
        tokenizer.chat_template = template
        tokenizer.save_pretrained(root / f"tok-{name}")
    tokenizer.chat_template = None
    latin1 = root / "tok-latin1"
    tokenizer.save_pretrained(latin1)
    (latin1 / "chat_template.jinja").write_bytes(b"{{ '\xe9' }}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    for name in ("ok", *MODELS):  # model-ok is the working default of every train case
        directory = root / f"model-{name}"
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    weights = root / "model-truncated-weights" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (root / "model-garbage-weights" / "model.safetensors").write_bytes(os.urandom(4096))
    (root / "model-garbage-config" / "config.json").write_text("{not json")
    (root / "model-no-config" / "config.json").unlink()
    (root / "model-vision-config" / "config.json").write_text(json.dumps(
        {"model_type": "vit", "hidden_size": 16}))
    (root / "model-no-weights" / "model.safetensors").unlink()
    (root / "config.yaml").write_text("learning_rate: [unclosed\n")
    (root / "config-list.yaml").write_text("- a\n- b\n")
    (root / "config-bad.json").write_text("{")
    (root / "a-file").write_text("not a directory")
    return root


TEMPLATES = {
    "zerodiv": "{{ 1 / 0 }}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "huge-range": "{% for i in range(10**12) %}x{% endfor %}",
    "syntax": "{% for %}",
    "undefined-call": "{{ no_such_function() }}",
    "attribute-loop": "{{ messages[0].content.nope.deeper }}",
    "raise": "{{ raise_exception('this template refuses everything') }}",
}
MODELS = ("truncated-weights", "garbage-weights", "garbage-config", "no-config",
          "vision-config", "no-weights")

BAD_FLAGS = [
    (("--num_train_epochs", "0", "--max_steps", "-1"), "--num_train_epochs"),
    (("--max_steps", "0"), "--max_steps"), (("--max_steps", "-7"), "--max_steps"),
    (("--max_steps", "four"), "--max_steps"), (("--save_steps", "-1"), "--save_steps"),
    (("--save_steps", "0"), "--save_steps"), (("--logging_steps", "0"), "logging_steps"),
    (("--learning_rate", "-0.001"), "--learning_rate"),
    (("--learning_rate", "fast"), "--learning_rate"),
    (("--per_device_train_batch_size", "0"), "--per_device_train_batch_size"),
    (("--per_device_eval_batch_size", "0"), "--per_device_eval_batch_size"),
    (("--gradient_accumulation_steps", "0"), "--gradient_accumulation_steps"),
    (("--logits_chunk_size", "0"), "--logits_chunk_size"), (("--max_length", "0"), "--max_length"),
    (("--report_to", "nosuchtool"), "--report_to"), (("--warmup_steps", "-1"), "warmup_steps"),
    (("--learning_rat", "0.1"), "--learning_rat"), (("--bf16", "maybe"), "--bf16"),
    (("--save_strategy", "sometimes"), "--save_strategy"),
    (("--eval_strategy", "steps", "--eval_steps", "1"), "--eval_dataset"),
    (("--metric_for_best_model", "accuracy"), "--metric_for_best_model"),
    (("--deepspeed", "no-such-ds.json"), "deepspeed"),
    (("--use_lora", "true", "--lora_r", "0"), "--lora_r"),
    (("--use_lora", "true", "--lora_alpha", "-8"), "--lora_alpha"),
    (("--use_lora", "true", "--lora_dropout", "1"), "--lora_dropout"),
    (("--lr_scheduler_type", "wobbly"), "--lr_scheduler_type"),
    (("--no_such_flag", "1"), "--no_such_flag"), (("--seed",), "--seed"),
    (("--resume_from_checkpoint", "no-such-checkpoint"), "--resume_from_checkpoint"),
    (("--resume_from_checkpoint", "true"), "--resume_from_checkpoint"),
    (("--template", "no-such-template"), "no-such-template"),
    (("--collator", "no-such-collator"), "no-such-collator"),
    (("--perturber", "no-such-perturber"), "no-such-perturber"),
    (("--perturber", "neftune", "--perturber_alpha", "-1"), "alpha"),
    (("--perturber", "neftune", "--perturber_alpha", "loud"), "--perturber_alpha"),
    (("--perturber_alpha", "3"), "--perturber"),
    (("--collator_no_such_option", "1"), "no_such_option"),
    (("--template_no_such_variable", "1"), "no_such_variable"),
    (("--load_in_4bit", "true", "--load_in_8bit", "true", "--use_lora", "true"), "exclude"),
    (("--packing", "true"), "--packing"),
    (("--dataset_format", "nonsense"), "nonsense"),
    (("--on_bad_example", "ignore"), "ignore"),
]


def _cases() -> list[Case]:
    cases: list[Case] = []
    for name, (filename, _, names) in DATA.items():
        whole_file = not names.startswith(":")  # skip mode drops a bad line; not a whole file
        for command in DATA_COMMANDS if whole_file else ("check-data", "train"):
            cases.append(Case(f"{command}:{name}", (command, "{root}/" + filename),
                              names if whole_file else filename + names))
        if name not in RENDERABLE:
            cases.append(Case(f"render:{name}", ("render", "{root}/" + filename, "--template",
                                                 "llama-3.1"), filename))
    for flags, names in BAD_FLAGS:
        cases.append(Case(f"train-flag:{' '.join(flags)}", ("train", *flags), names))
    for name in TEMPLATES:
        cases.append(Case(f"render-template:{name}", ("render", "{root}/ok.jsonl",
                                                      "--tokenizer", f"{{root}}/tok-{name}"),
                          "template"))
        cases.append(Case(f"train-template:{name}", ("train", "--tokenizer_name_or_path",
                                                     f"{{root}}/tok-{name}"), "template"))
    cases.append(Case("render-template:latin1", ("render", "{root}/ok.jsonl", "--tokenizer",
                                                 "{root}/tok-latin1"), "tok-latin1"))
    for name in MODELS:
        cases.append(Case(f"train-model:{name}", ("train", "--model_name_or_path",
                                                  f"{{root}}/model-{name}"), f"model-{name}"))
        cases.append(Case(f"chat-model:{name}", ("chat", f"{{root}}/model-{name}", "-p", "hi"),
                          f"model-{name}"))
    cases += [
        Case("render:option-unknown", ("render", "{root}/ok.jsonl", "--template", "llama-3.1",
                                       "-o", "nosuchvar=1"), "nosuchvar"),
        Case("render:option-not-pair", ("render", "{root}/ok.jsonl", "--template", "llama-3.1",
                                        "-o", "nosuchvar"), "nosuchvar"),
        Case("render:html-missing-folder", ("render", "{root}/ok.jsonl", "--template",
                                            "llama-3.1", "--html", "{root}/none/x.html"),
             "x.html"),
        Case("render:no-template", ("render", "{root}/ok.jsonl"), "--template"),
        Case("render:directory", ("render", "{root}/a-directory.jsonl", "--template",
                                  "llama-3.1"), "a-directory.jsonl"),
        Case("render:missing", ("render", "{root}/none.jsonl", "--template", "llama-3.1"),
             "none.jsonl"),
        Case("check-data:missing", ("check-data", "{root}/none.jsonl"), "none.jsonl"),
        Case("check-data:directory", ("check-data", "{root}/a-directory.jsonl"),
             "a-directory.jsonl"),
        Case("check-data:template", ("check-data", "{root}/ok.jsonl", "--template", "nope"),
             "nope"),
        Case("doctor:missing", ("doctor", "{root}/none"), "none"),
        Case("doctor:file", ("doctor", "{root}/a-file"), "a-file"),
        Case("chat:missing", ("chat", "{root}/none", "-p", "hi"), "none"),
        Case("chat:max-new-tokens", ("chat", "{root}/model-no-weights", "-p", "hi",
                                     "--max_new_tokens", "-1"), "--max_new_tokens"),
        Case("train:config-yaml", ("train", "--config", "{root}/config.yaml"), "config.yaml"),
        Case("train:config-list", ("train", "--config", "{root}/config-list.yaml"),
             "config-list.yaml"),
        Case("train:config-json", ("train", "--config", "{root}/config-bad.json"),
             "config-bad.json"),
        Case("train:config-missing", ("train", "--config", "{root}/none.yaml"), "none.yaml"),
        Case("train:output-dir-file", ("train", "--output_dir", "{root}/a-file"), "a-file"),
        Case("demo:max-steps", ("demo", "--max_steps", "0", "--output_dir", "{out}"),
             "--max_steps"),
        Case("demo:batch", ("demo", "--batch-size", "-1", "--output_dir", "{out}"),
             "--batch-size"),
        Case("demo:output-file", ("demo", "--output_dir", "{root}/a-file"), "a-file"),
        Case("command:unknown", ("trian",), "trian"),
        Case("list:flag", ("list", "--bogus"), "--bogus"),
    ]
    return cases


CASES = _cases()
TRAIN_DEFAULTS = ("--model_name_or_path", "{root}/model-ok", "--dataset", "{root}/ok.jsonl",
                  "--output_dir", "{out}", "--template", "llama-3.1", "--max_steps", "1",
                  "--use_cpu", "true", "--report_to", "none")


def _argv(case: Case, root: Path, out: Path) -> list[str]:
    """The case's command line; ``train`` gets working defaults for every flag it lacks (a
    tokenizer given alone brings its own template)."""
    argv = list(case.argv)
    if argv[0] in ("check-data-skip", "train-skip"):
        argv = [argv[0].removesuffix("-skip"), *argv[1:], "--on_bad_example", "skip"]
    if argv[0] == "train" and "--config" not in argv:
        if argv[1:2] and not argv[1].startswith("--"):  # a data file
            argv = ["train", "--dataset", *argv[1:]]
        given = set(argv)
        defaults = TRAIN_DEFAULTS
        for at in range(0, len(defaults), 2):
            flag = defaults[at]
            if flag in given or (flag == "--template" and "--tokenizer_name_or_path" in given):
                continue
            argv += defaults[at:at + 2]
    return [a.format(root=root, out=out) for a in argv]


def test_there_are_at_least_200_cases():
    assert len(CASES) >= 200, len(CASES)
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_is_one_error_line(case: Case, world: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(main, _argv(case, world, out))
    output = result.output
    assert not (result.exception and not isinstance(result.exception, SystemExit)), (
        f"{case.name}: {result.exception!r}")
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert result.exit_code == 2, (case.name, result.exit_code, output[-2000:])
    assert len(errors) == 1, (case.name, lines[-10:])
    assert case.names.lower() in errors[0].lower(), (case.names, errors[0])
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


def test_a_full_data_cache_is_named_not_blamed_on_the_data_file(tmp_path: Path,
                                                                on_small_disk) -> None:
    """The cache on a 256 KiB tmpfs and a 2 MB data file: the error names the cache and says
    what to do, not that the data is unreadable."""
    import sys

    data = tmp_path / "big.jsonl"
    data.write_text((json.dumps(GOOD) + "\n") * 20_000)
    cache = tmp_path / "cache"
    cache.mkdir()
    result = on_small_disk(cache, 256 << 10, f"HF_DATASETS_CACHE='{cache}' '{sys.executable}' "
                                             f"-m sft_plugins check-data '{data}'")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in output, output[-2000:]
    assert f"cannot write its copy into the data cache {cache}" in errors[0], errors[0]


def test_a_user_error_from_the_installed_command_is_its_only_line(tmp_path: Path) -> None:
    """In a fresh process, as a user runs it: nothing a dependency logs on import (bitsandbytes
    warns on some CPUs that it cannot fetch a kernel from the hub) stands above the error."""
    import subprocess
    import sys

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(GOOD) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "sft_plugins", "train", "--model_name_or_path",
         str(tmp_path / "no-model"), "--dataset", str(data), "--output_dir",
         str(tmp_path / "out"), "--streaming", "true"],
        capture_output=True, text=True, check=False)
    assert result.returncode == 2 and result.stdout == "", result.stdout[-2000:]
    assert result.stderr.splitlines() == [
        "error: --streaming needs --max_steps: a stream has no length, so the number of "
        "optimizer steps cannot follow from --num_train_epochs; give --max_steps N"]


@pytest.mark.parametrize(("flag", "name", "expected"), [
    ("--model_name_or_path", "some-org/no-such-model",
     "error: cannot load a tokenizer from 'some-org/no-such-model': We couldn't connect to "),
    ("--dataset", "some-org/no-such-data",
     "error: some-org/no-such-data: not a local file, and datasets.load_dataset("),
])
def test_a_hub_name_that_cannot_be_reached_is_one_line(flag: str, name: str, expected: str,
                                                       world: Path, tmp_path: Path) -> None:
    """Offline (here: a hub address where nothing listens), huggingface_hub retries each
    request five times and logs two lines a try, and transformers' error holds a newline: the
    user still reads one line. (The retries' waits are skipped, not their attempts.)"""
    import subprocess
    import sys

    argv = ["train", "--model_name_or_path", str(world / "model-ok"), "--template", "llama-3.1",
            "--use_cpu", "true", "--dataset", str(world / "ok.jsonl"), "--output_dir",
            str(tmp_path / "out")]
    argv[argv.index(flag) + 1] = name
    program = ("import sys, time; time.sleep = lambda seconds: None\n"
               "from sft_plugins.cli import main\n"
               f"sys.argv = ['sft-plugins', *{argv!r}]; main()")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            check=False, env={**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9",
                                              "HF_HUB_OFFLINE": "0"})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(expected), lines


def test_push_to_hub_without_a_reachable_hub_is_one_line_before_training(world: Path,
                                                                          tmp_path: Path) -> None:
    """The Trainer creates the hub repository when it is built: offline, that was a traceback
    from the HTTP client."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "sft_plugins", "train", "--model_name_or_path",
         str(world / "model-ok"), "--template", "llama-3.1", "--use_cpu", "true", "--dataset",
         str(world / "ok.jsonl"), "--output_dir", str(tmp_path / "out"), "--push_to_hub", "true",
         "--hub_model_id", "some-org/some-model", "--report_to", "none"],
        capture_output=True, text=True, check=False,
        env={**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith(
        "error: --push_to_hub: cannot create the hub repository 'some-org/some-model' ("), errors
    assert result.stderr.strip().endswith(errors[0])
    assert not (tmp_path / "out" / "model.safetensors").exists()
