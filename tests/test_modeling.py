"""Model loading: directories, LoRA, 4/8-bit QLoRA on the CPU, and one clear error per bad flag."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from sft_plugins.assets import LLAMA3_TOKENIZER_DIR
from sft_plugins.errors import ModelLoadError
from sft_plugins.modeling import ModelArguments, load_model, load_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def one_backward(model) -> None:
    ids = torch.randint(3, 128, (2, 8))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)


def test_loads_a_local_directory_in_full(model_dir):
    model = load_model(ModelArguments(model_name_or_path=str(model_dir)))
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    assert all(p.requires_grad for p in model.parameters())


def test_attn_implementation_sdpa_packed_is_known_to_transformers(model_dir):
    model = load_model(ModelArguments(model_name_or_path=str(model_dir),
                                      attn_implementation="sdpa_packed"))
    assert model.config._attn_implementation == "sdpa_packed"
    one_backward(model)


def test_lora_defaults_to_every_linear_layer_but_the_head(model_dir):
    model = load_model(ModelArguments(model_name_or_path=str(model_dir), use_lora=True,
                                      lora_r=4))
    targets = {t.rsplit(".", 1)[-1] for t in model.peft_config["default"].target_modules}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
            "down_proj"} == targets
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    one_backward(model)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="bitsandbytes is part of the qlora extra that `make test` installs")
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_loads_quantized_and_trains_adapters_on_cpu(model_dir, bits):
    args = ModelArguments(model_name_or_path=str(model_dir), use_lora=True, lora_r=4,
                          load_in_4bit=bits == 4, load_in_8bit=bits == 8)
    model = load_model(args)
    base = model.get_base_model()
    quantized = [type(m).__name__ for m in base.modules()]
    assert ("Linear4bit" if bits == 4 else "Linear8bitLt") in quantized
    one_backward(model)


def test_tokenizer_defaults_to_the_models(model_dir):
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(model_dir),
                                              tokenizer_name_or_path=str(LLAMA3_TOKENIZER_DIR)))
    assert tokenizer.bos_token == "<|begin_of_text|>"


@pytest.mark.parametrize(("change", "message"), [
    ({"model_name_or_path": "./no/such/dir"}, "does not exist"),
    ({"load_in_4bit": True, "load_in_8bit": True, "use_lora": True}, "exclude each other"),
    ({"load_in_4bit": True}, "add --use_lora"),
    ({"use_lora": True, "lora_target_modules": ["qkv_proj"]}, "Its linear layers are named"),
    ({"dtype": "float12"}, "not a torch dtype"),
])
def test_bad_requests_fail_before_training_with_what_to_change(model_dir, change, message):
    args = ModelArguments(model_name_or_path=str(model_dir))
    for key, value in change.items():
        setattr(args, key, value)
    with pytest.raises(ModelLoadError, match=message):
        load_model(args)


def test_not_a_causal_lm(tmp_path):
    AutoConfig.for_model("vit").save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        load_model(ModelArguments(model_name_or_path=str(tmp_path)))


def test_missing_bitsandbytes_is_named(model_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"pip install 'sft-plugins\[qlora\]'"):
        load_model(ModelArguments(model_name_or_path=str(model_dir), load_in_4bit=True,
                                  use_lora=True))


def test_a_file_is_not_a_model_directory(model_dir):
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(ModelArguments(model_name_or_path=str(model_dir / "config.json")))


def test_missing_model_directory_is_named_as_the_model():
    with pytest.raises(ModelLoadError, match=r"^model './nope' does not exist"):
        load_tokenizer(ModelArguments(model_name_or_path="./nope"))
