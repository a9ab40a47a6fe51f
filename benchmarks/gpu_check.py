"""One prepared run of the CUDA paths, for a session that has a GPU for a few minutes.

Checks and measures, each in isolation so one failure does not hide the others:

1. bf16 training step on a Llama-shaped model with the real 128 256-entry vocabulary:
   trained-positions-only ``lm_head`` vs full logits (time per step, peak allocated memory, and
   that both give the same loss);
2. 4-bit QLoRA (bitsandbytes NF4 + LoRA) loading and training a few steps on the GPU;
3. the built-in demo on the GPU (time and held-out exact match);
4. DeepSpeed ZeRO-3 through ``sft-plugins train --deepspeed`` (one process under ``torchrun``):
   losses equal to the same run without it, and a ZeRO-3 checkpoint that resumes to the same
   final loss (DeepSpeed cannot run on the CPU-only development machine, see docs/training.md);
5. which attention kernels are available (SDPA, FlashAttention).

Writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out``. Run: ``python -m benchmarks.gpu_check
--out DIR``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch


def environment() -> dict[str, Any]:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "flash_attn": importlib.util.find_spec("flash_attn") is not None,
            "bitsandbytes": importlib.util.find_spec("bitsandbytes") is not None}


def llama(vocab: int, hidden: int, layers: int, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=max(1, hidden // 256), max_position_embeddings=4096,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def step_benchmark(out_dir: Path, batch: int = 8, length: int = 1024,
                   completion: float = 0.25) -> dict[str, Any]:
    """Time and peak memory of forward+backward with both loss paths on identical batches."""
    from transformers import TrainingArguments

    from sft_plugins.trainer import SFTPluginTrainer

    device = torch.device("cuda")
    model = llama(128_256, 1024, 4, torch.bfloat16).to(device).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128_000, (batch, length), generator=g)
    labels = ids.clone()
    labels[:, : int(length * (1 - completion))] = -100
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
              "labels": labels.to(device)}
    results: dict[str, Any] = {"batch": batch, "length": length, "trained_fraction": completion,
                               "vocab": 128_256, "hidden": 1024, "layers": 4}
    for name, full in (("trained_positions", False), ("full_logits", True)):
        args = TrainingArguments(output_dir=str(out_dir / name), report_to=[], bf16=True)
        trainer = SFTPluginTrainer(model=model, args=args, data_collator=lambda f: f,
                                   full_logits=full)
        times, loss = [], None
        torch.cuda.reset_peak_memory_stats()
        for i in range(13):
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = trainer.compute_loss(model, dict(inputs))
            loss.backward()
            torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
        results[name] = {"ms_per_step": 1000 * statistics.median(times),
                         "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                         "loss": float(loss)}
    results["time_ratio"] = (results["trained_positions"]["ms_per_step"]
                             / results["full_logits"]["ms_per_step"])
    results["memory_ratio"] = (results["trained_positions"]["peak_gib"]
                               / results["full_logits"]["peak_gib"])
    return results


def qlora_check(out_dir: Path) -> dict[str, Any]:
    """NF4 QLoRA on the GPU through the same loading code as ``sft-plugins train``."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainingArguments

    from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
    from sft_plugins.demo import example, letter_sets
    from sft_plugins.modeling import ModelArguments, load_model
    from sft_plugins.trainer import SFTPluginTrainer

    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        llama(len(tokenizer), 512, 4, torch.float32).save_pretrained(tmp)
        model = load_model(ModelArguments(model_name_or_path=tmp, use_lora=True, lora_r=16,
                                          load_in_4bit=True), bf16=True,
                           gradient_checkpointing=True)
        kinds = sorted({type(m).__name__ for m in model.modules() if "4bit" in type(m).__name__})
        data = Dataset.from_list([example(s) for s in letter_sets(0, 640)])
        args = TrainingArguments(output_dir=str(out_dir / "qlora"), max_steps=40,
                                 per_device_train_batch_size=16, learning_rate=2e-3, bf16=True,
                                 use_cpu=not torch.cuda.is_available(),
                                 logging_steps=10, report_to=[], save_strategy="no",
                                 gradient_checkpointing=True,
                                 gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer = SFTPluginTrainer(model=model, args=args, train_dataset=data,
                                   processing_class=tokenizer, template="llama-3.1",
                                   collator="completion-only", perturber="neftune")
        start = time.perf_counter()
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"quantized_modules": kinds, "losses": losses,
            "seconds": time.perf_counter() - start, "learned": losses[-1] < losses[0]}


def demo_check(out_dir: Path) -> dict[str, Any]:
    from sft_plugins.demo import run_demo

    result = run_demo(out_dir / "demo")
    return {"before": result.before, "after": result.after, "seconds": result.seconds,
            "steps": result.steps}


ZERO3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
         "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
         "gradient_clipping": "auto", "bf16": {"enabled": "auto"}}


def deepspeed_check(out_dir: Path) -> dict[str, Any]:
    """ZeRO-3 as a user runs it: losses equal a run without DeepSpeed, and resuming from a
    ZeRO-3 checkpoint reaches the same final loss."""
    found = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True)
    if found.returncode:  # looked for where the runs below will look (their PYTHONPATH)
        return {"error": "deepspeed is not installed: pip install deepspeed, then run again"}
    from transformers import AutoTokenizer

    from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
    from sft_plugins.demo import example, letter_sets

    work = out_dir / "deepspeed"
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR)
    llama(len(tokenizer), 256, 2, torch.float32).save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(example(s)) + "\n" for s in letter_sets(0, 256)))
    config = work / "zero3.json"
    config.write_text(json.dumps(ZERO3))

    def train(name: str, *extra: str) -> list[float]:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                        "-m", "sft_plugins", "train", "--model_name_or_path", str(work / "model"),
                        "--dataset", str(data), "--template", "llama-3.1", "--output_dir",
                        str(work / name), "--max_steps", "4", "--per_device_train_batch_size",
                        "8", "--logging_steps", "1", "--report_to", "none", "--seed", "0",
                        *extra], check=True, capture_output=True, text=True, timeout=600)
        state = json.loads((work / name / "trainer_state.json").read_text())
        return [h["loss"] for h in state["log_history"] if "loss" in h]

    plain = train("plain", "--save_strategy", "no")
    zero3 = train("zero3", "--deepspeed", str(config), "--save_steps", "2")
    resumed = train("zero3", "--deepspeed", str(config), "--save_steps", "2",
                    "--resume_from_checkpoint", str(work / "zero3" / "checkpoint-2"))
    return {"plain_losses": plain, "zero3_losses": zero3, "resumed_losses": resumed,
            "losses_equal": len(plain) == len(zero3) and all(
                abs(a - b) <= 1e-3 * max(1.0, abs(a)) for a, b in zip(plain, zero3, strict=True)),
            "resume_equal": abs(resumed[-1] - zero3[-1]) <= 1e-3 * max(1.0, abs(zero3[-1]))}


def markdown(report: dict[str, Any]) -> str:
    lines = ["# GPU check", "", f"`{json.dumps(report['environment'])}`", ""]
    step = report.get("step")
    if isinstance(step, dict) and "trained_positions" in step:
        lines += ["| loss path | ms / step | peak GiB | loss |", "|---|---|---|---|"]
        for name in ("trained_positions", "full_logits"):
            r = step[name]
            lines.append(f"| {name} | {r['ms_per_step']:.1f} | {r['peak_gib']:.2f} | "
                         f"{r['loss']:.4f} |")
        lines += ["", f"time ratio {step['time_ratio']:.2f}, memory ratio "
                  f"{step['memory_ratio']:.2f} (batch {step['batch']} x {step['length']} tokens,"
                  f" {step['trained_fraction']:.0%} trained, vocabulary {step['vocab']})", ""]
    for key in ("qlora", "demo", "deepspeed"):
        lines.append(f"- {key}: `{json.dumps(report.get(key))}`")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-check")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))  # checkpoints and models stay here
    report: dict[str, Any] = {"environment": environment()}
    for key, check in (("step", step_benchmark), ("qlora", qlora_check), ("demo", demo_check),
                       ("deepspeed", deepspeed_check)):
        try:
            report[key] = check(work)
        except Exception:
            report[key] = {"error": traceback.format_exc(limit=6)}
        print(key, json.dumps(report[key], indent=1)[:2000], flush=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text(markdown(report))


if __name__ == "__main__":
    main()
