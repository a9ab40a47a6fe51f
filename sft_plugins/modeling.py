"""Loading the model and tokenizer to train: local directories or hub names, LoRA, QLoRA.

Everything that can be wrong with the request (a missing directory, a model that is not a causal
LM, 4-bit and 8-bit together, bitsandbytes missing, LoRA targets that match nothing) fails here
with a :class:`~sft_plugins.errors.ModelLoadError` before any training starts.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import sft_plugins.attention  # noqa: F401  (registers attn_implementation="sdpa_packed")
from sft_plugins.arguments import ModelArguments
from sft_plugins.errors import ModelLoadError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _check_source(name: str, what: str) -> None:
    if os.path.isdir(name):
        return
    if os.path.exists(name):
        raise ModelLoadError(f"{what} {name!r} is a file; give the directory that holds "
                             "config.json (or a hub name)")
    if not _HUB_ID.match(name) or name.startswith((".", "/", "~")):
        raise ModelLoadError(f"{what} {name!r} does not exist. Give an existing directory "
                             "or a hub name such as 'meta-llama/Llama-3.1-8B-Instruct'")


def _resolve_dtype(args: ModelArguments, bf16: bool, fp16: bool) -> torch.dtype:
    if args.dtype != "auto":
        try:
            dtype = getattr(torch, args.dtype)
        except AttributeError:
            dtype = None
        if not isinstance(dtype, torch.dtype):
            raise ModelLoadError(f"--dtype {args.dtype!r} is not a torch dtype; use auto, "
                                 "bfloat16, float16 or float32")
        return dtype
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32


def quantization_config(args: ModelArguments, compute_dtype: torch.dtype) -> Any:
    """The bitsandbytes config for ``--load_in_4bit`` / ``--load_in_8bit`` (``None`` without)."""
    if args.load_in_4bit and args.load_in_8bit:
        raise ModelLoadError("--load_in_4bit and --load_in_8bit exclude each other; pick one")
    if not (args.load_in_4bit or args.load_in_8bit):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        flag = "--load_in_4bit" if args.load_in_4bit else "--load_in_8bit"
        raise ModelLoadError(f"{flag} needs bitsandbytes, which is not installed: "
                             "pip install 'sft-plugins[qlora]'")
    from transformers import BitsAndBytesConfig

    if args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=args.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_tokenizer(args: ModelArguments) -> Any:
    """The tokenizer of ``--tokenizer_name_or_path`` or of the model."""
    name = args.tokenizer_name_or_path or args.model_name_or_path
    _check_source(name, "tokenizer" if args.tokenizer_name_or_path else "model")
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {name!r}: {exc}") from exc


def load_model(args: ModelArguments, *, bf16: bool = False, fp16: bool = False,
               gradient_checkpointing: bool = False) -> PreTrainedModel:
    """Load the causal LM, quantized and/or wrapped with LoRA adapters as ``args`` ask."""
    _check_source(args.model_name_or_path, "model")
    dtype = _resolve_dtype(args, bf16, fp16)
    quantization = quantization_config(args, dtype)
    if quantization is not None and not args.use_lora:
        raise ModelLoadError("a quantized model cannot be trained directly; add --use_lora "
                             "(QLoRA) or drop --load_in_4bit/--load_in_8bit")
    try:
        config = AutoConfig.from_pretrained(args.model_name_or_path,
                                            trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read a model config from {args.model_name_or_path!r}: "
                             f"{exc}") from exc
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not args.trust_remote_code:
        raise ModelLoadError(
            f"{args.model_name_or_path!r} is a {config.model_type!r} model, not a causal language "
            "model; supervised fine-tuning needs one (Llama, Qwen, Gemma, Mistral, Phi, ...)")
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": args.trust_remote_code}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        if torch.cuda.is_available():  # quantized weights load onto this process's GPU
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, **kwargs)
    except (OSError, SafetensorError) as exc:
        raise ModelLoadError(f"model {args.model_name_or_path!r}: its weights cannot be read "
                             f"({type(exc).__name__}: {exc}); the file may be truncated or "
                             "corrupt: download or save it again") from None
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.use_lora:
        model = add_lora(model, args)
    return model


def add_lora(model: PreTrainedModel, args: ModelArguments) -> Any:
    """Wrap ``model`` with LoRA adapters on ``args.lora_target_modules`` (default all-linear)."""
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = args.lora_target_modules or "all-linear"
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear)})
        raise ModelLoadError(
            f"--lora_target_modules {targets!r} matches no module of this model ({exc}). "
            f"Its linear layers are named: {', '.join(linear)}") from exc


__all__ = ["ModelArguments", "add_lora", "load_model", "load_tokenizer", "quantization_config"]
