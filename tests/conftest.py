"""Shared fixtures: real (entry-point carrying) distributions without pip; a tiny chat model
and data set for training runs."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sft_plugins.assets import LLAMA3_TOKENIZER_DIR

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    # a suite started in the background (``nohup``, or ``&`` in a script) inherits Ctrl-C
    # ignored, and so would every process it starts; the Ctrl-C tests need it delivered, as it
    # is in a terminal (a process started from here gets it at its default again)
    signal.signal(signal.SIGINT, signal.default_int_handler)

pytest_plugins = ["pytester", "skip_policy"]  # skip_policy.py, beside this file

DistributionMaker = Callable[..., Path]


def write_distribution(root: Path, name: str, modules: dict[str, str],
                       entry_points: dict[str, str], version: str = "0.1.0") -> Path:
    """Lay out ``root`` as a site directory holding one installed distribution.

    ``modules`` maps a module file path (``pkg/__init__.py``) to its source; ``entry_points``
    maps entry-point names of the ``sft_plugins`` group to ``module:attr`` targets. The
    ``*.dist-info`` folder is what pip writes, so ``importlib.metadata`` finds it exactly as
    it finds an installed package.
    """
    for relative, source in modules.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    dist_info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = ["[sft_plugins]", *(f"{k} = {v}" for k, v in entry_points.items())]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def site_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on ``sys.path`` (and ``PYTHONPATH`` for subprocesses) to install into."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.delenv("SFT_PLUGINS_DISABLE", raising=False)
    monkeypatch.delenv("SFT_PLUGINS_TRACE", raising=False)
    before = set(sys.modules)
    yield site
    for module in set(sys.modules) - before:  # let the next test import its own copies
        del sys.modules[module]
    importlib.invalidate_caches()


@pytest.fixture
def install(site_dir: Path) -> DistributionMaker:
    """Install a distribution into ``site_dir``: ``install(name, modules, entry_points)``."""

    def _install(name: str, modules: dict[str, str], entry_points: dict[str, str]) -> Path:
        write_distribution(site_dir, name, modules, entry_points)
        importlib.invalidate_caches()
        return site_dir

    return _install


SmallDisk = Callable[[Path, int, str], "subprocess.CompletedProcess[str]"]


@pytest.fixture
def on_small_disk() -> SmallDisk:
    """``run(mountpoint, size, command)``: the shell ``command`` with a tmpfs of ``size`` bytes
    mounted at ``mountpoint``, in a user and mount namespace of its own (``unshare``: no
    privileges needed, nothing mounted outside). What it wrote there is gone afterwards."""

    def run(mountpoint: Path, size: int, command: str) -> subprocess.CompletedProcess[str]:
        assert shutil.which("unshare"), "util-linux's unshare is needed"
        script = f"mount -t tmpfs -o size={size} tmpfs '{mountpoint}' && {command}"
        return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                               script], capture_output=True, text=True, timeout=300)

    return run


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved with the shipped Llama 3 tokenizer, which has no template."""
    path = tmp_path_factory.mktemp("model")
    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )).save_pretrained(path)
    tokenizer.save_pretrained(path)  # no chat template: --template names one
    return path


@pytest.fixture(scope="module")
def chat_data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight conversational prompt/completion examples (sort three letters)."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"Sort the letters: {w}"}],
             "completion": [{"role": "assistant", "content": " ".join(sorted(w.split()))}]}
            for w in ("c a b", "q p r", "z x y", "m k l", "f d e", "j h i", "w u v", "t r s")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tiny_llama() -> Callable[[str], LlamaForCausalLM]:
    """Builds the same small Llama (vocabulary 97, 2 layers, 4 heads over 2 key/value heads)
    with the attention implementation asked for, for comparing implementations."""

    def build(attn: str) -> LlamaForCausalLM:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=128, pad_token_id=0)
        config._attn_implementation = attn
        return LlamaForCausalLM(config)

    return build
