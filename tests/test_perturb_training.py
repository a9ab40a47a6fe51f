"""Perturbers on real models: hook lifecycle, wrappers, gradients, Trainer/SFTTrainer, resuming."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from sft_plugins_perturbers import NEFTune
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from sft_plugins.callbacks import PerturberCallback, attach_perturber
from sft_plugins.errors import PerturberError
from sft_plugins.perturb import BatchInfo, find_input_embeddings
from sft_plugins.testing import plugin_manager

PERTURBERS = plugin_manager("sft_plugins_perturbers").perturbers
VOCAB = 128


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(config)


def batch(rows: int = 3, width: int = 12) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (rows, width), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([width - 5 * (r % 2) for r in range(rows)])
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return {"input_ids": ids * mask, "attention_mask": mask,
            "labels": (ids * mask).masked_fill(mask == 0, -100)}


class Recording(NEFTune):
    """neftune that keeps, per call, the step, the lengths it was told and the noise it added."""

    def __init__(self, **options):
        super().__init__(**options)
        self.seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def perturb(self, embeddings: torch.Tensor, batch: BatchInfo) -> torch.Tensor:
        out = super().perturb(embeddings, batch)
        self.seen.append((batch.step, batch.lengths.clone(), (out - embeddings).detach()))
        return out


def embedding_outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the decoder receives from the embeddings (after every hook) for ``inputs``."""
    seen: list[torch.Tensor] = []
    handle = find_input_embeddings(model).register_forward_hook(
        lambda module, args, output: seen.append(output.detach()))
    try:
        model(**inputs)
    finally:
        handle.remove()
    return seen[0]


def test_noise_only_in_training_mode_and_gone_when_the_block_ends():
    model, inputs = tiny_llama(), batch()
    model.train()
    clean_train = model(**inputs).logits
    with PERTURBERS.create("neftune", alpha=5.0).install(model) as handle:
        assert not torch.equal(model(**inputs).logits, clean_train)
        model.eval()
        with torch.no_grad():
            clean_eval = model(**inputs).logits
        assert handle.installed
        model.train()
    assert not handle.installed
    assert torch.equal(model(**inputs).logits, clean_train)
    model.eval()
    with torch.no_grad(), PERTURBERS.create("neftune", alpha=5.0).install(model):
        assert torch.equal(model(**inputs).logits, clean_eval)
        generated = model.generate(inputs["input_ids"][:1], max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, model.generate(inputs["input_ids"][:1], max_new_tokens=3,
                                                 do_sample=False))


def test_hooks_are_removed_when_training_raises():
    model, inputs = tiny_llama(), batch()
    model.train()
    clean = model(**inputs).logits
    with pytest.raises(RuntimeError, match="boom"), \
            PERTURBERS.create("symnoise").install(model) as handle:
        model(**inputs)
        raise RuntimeError("boom")
    assert not handle.installed
    assert torch.equal(model(**inputs).logits, clean)


@pytest.mark.parametrize("kind,options", [("neftune", {"alpha": 0.0}), ("none", {})])
def test_alpha_zero_and_none_change_nothing_in_training(kind, options):
    model, inputs = tiny_llama(), batch()
    model.train()
    clean = model(**inputs).logits
    with PERTURBERS.create(kind, **options).install(model):
        assert torch.equal(model(**inputs).logits, clean)


def test_the_hook_reads_real_lengths_pads_and_prompt_from_the_model_inputs():
    model, inputs = tiny_llama(), batch()
    model.train()
    clean = embedding_outputs(model, inputs)
    inputs["labels"][:, :3] = -100  # a three-token prompt
    recorder = Recording(alpha=5.0, noise_prompt=False)
    with recorder.install(model):
        noisy = embedding_outputs(model, inputs)
    (_, lengths, noise), = recorder.seen
    real = inputs["attention_mask"].bool()
    assert torch.equal(lengths, (real.sum(1, keepdim=True) * real).float())
    assert torch.equal(noisy[~real], clean[~real])
    assert torch.equal(noisy[:, :3], clean[:, :3])
    assert (noise[:, 3:][real[:, 3:]] != 0).any()


def test_labels_kept_out_of_the_model_call_can_be_handed_to_the_handle():
    model, inputs = tiny_llama(), batch()
    model.train()
    labels = inputs.pop("labels")
    labels[:, :3] = -100
    clean = embedding_outputs(model, inputs)
    with PERTURBERS.create("neftune", noise_prompt=False).install(model) as handle:
        handle.set_labels(labels)
        noisy = embedding_outputs(model, inputs)
        with pytest.raises(PerturberError, match=r"set_labels"):  # forgotten after a forward
            model(**inputs)
    assert torch.equal(noisy[:, :3], clean[:, :3])
    assert not torch.equal(noisy[:, 3:], clean[:, 3:])


def test_packed_rows_take_segments_from_position_ids():
    model = tiny_llama()
    model.train()
    ids = torch.randint(1, VOCAB, (1, 10))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2, 3]])
    recorder = Recording(alpha=5.0)
    with recorder.install(model):
        model(input_ids=ids, position_ids=position_ids)
    (_, lengths, _), = recorder.seen
    assert lengths.tolist() == [[4.0] * 4 + [2.0] * 2 + [4.0] * 4]


def test_batch_inputs_that_do_not_match_the_embeddings_are_an_error():
    model, inputs = tiny_llama(), batch()
    model.train()
    with PERTURBERS.create("neftune").install(model), \
            pytest.raises(PerturberError, match=r"'neftune'.*attention_mask has shape"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"][:, :4])
    with PERTURBERS.create("neftune", noise_prompt=False).install(model), \
            pytest.raises(PerturberError, match=r"noise_prompt=False needs labels"):
        model(input_ids=inputs["input_ids"])


def test_a_model_without_input_embeddings_is_an_error_naming_the_perturber():
    with pytest.raises(PerturberError, match=r"perturber 'gaussian'.*Sequential.*"
                                             r"get_input_embeddings"):
        PERTURBERS.create("gaussian").install(nn.Sequential(nn.Linear(2, 2)))


def test_linear_schedule_needs_the_number_of_steps_before_training():
    with pytest.raises(PerturberError, match="total_steps"):
        PERTURBERS.create("neftune", schedule="linear").install(tiny_llama())


def test_gradients_reach_the_embeddings_through_the_noise():
    inputs = batch()
    clean = tiny_llama()
    clean.train()
    clean(**inputs).loss.backward()
    model = tiny_llama()
    model.train()
    with PERTURBERS.create("neftune", alpha=5.0).install(model):
        model(**inputs).loss.backward()
    grad = model.get_input_embeddings().weight.grad
    clean_grad = clean.get_input_embeddings().weight.grad
    assert grad is not None and clean_grad is not None
    assert torch.equal(grad != 0, clean_grad != 0), "the same rows get gradient, noise or not"
    assert grad.abs().sum() > 0
    assert not torch.equal(grad, clean_grad), "the gradient is taken at the noised point"


@pytest.mark.parametrize("perturber_first", [False, True])
def test_lora_with_gradient_checkpointing_and_input_require_grads(perturber_first):
    model, inputs = tiny_llama(), batch()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                  lora_dropout=0.0))
    peft_model.train()
    with torch.no_grad():
        clean_loss = peft_model(**inputs).loss.item()
    perturber = PERTURBERS.create("gaussian", alpha=5.0)
    with ExitStack() as stack:  # the two embedding hooks, in either order
        if perturber_first:
            stack.enter_context(perturber.install(peft_model))
        model.enable_input_require_grads()
        if not perturber_first:
            stack.enter_context(perturber.install(peft_model))
        loss = peft_model(**inputs).loss
        loss.backward()
    assert loss.item() != clean_loss
    lora = [p for n, p in peft_model.named_parameters() if "lora_B" in n]  # A: 0 at init
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    assert model.get_input_embeddings().weight.grad is None  # frozen, as PEFT left it


def test_embeddings_are_found_through_ddp_and_torch_compile(tmp_path: Path):
    model = tiny_llama()
    embeddings = model.get_input_embeddings()
    assert find_input_embeddings(torch.compile(model)) is embeddings
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                                world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(model)
        assert find_input_embeddings(wrapped) is embeddings
        wrapped.train()
        inputs = batch()
        recorder = Recording(alpha=5.0)
        with recorder.install(wrapped):
            wrapped(**inputs)
        (_, lengths, _), = recorder.seen
        assert lengths[1, 0] == inputs["attention_mask"][1].sum()
    finally:
        if owns_group:
            dist.destroy_process_group()


# --- Trainer and TRL's SFTTrainer ---------------------------------------------------------------


def dataset(rows: int = 16, width: int = 12) -> Dataset:
    generator = torch.Generator().manual_seed(5)
    examples = []
    for i in range(rows):
        length = 4 + i % (width - 3)
        ids = torch.randint(1, VOCAB, (width,), generator=generator)
        mask = (torch.arange(width) < length).long()
        examples.append({"input_ids": (ids * mask).tolist(), "attention_mask": mask.tolist(),
                         "labels": (ids * mask).masked_fill(mask == 0, -100).tolist()})
    return Dataset.from_list(examples)


def training_args(out: Path, **overrides) -> TrainingArguments:
    options = {"output_dir": str(out), "max_steps": 4, "per_device_train_batch_size": 2,
               "gradient_accumulation_steps": 2, "learning_rate": 1e-3, "seed": 3,
               "report_to": "none", "use_cpu": True, "save_strategy": "no",
               "disable_tqdm": True, "logging_strategy": "no", "dataloader_num_workers": 0}
    options.update(overrides)
    return TrainingArguments(**options)


def test_trainer_callback_noises_every_micro_batch_and_removes_itself(tmp_path: Path):
    recorder = Recording(alpha=5.0)
    trainer = Trainer(model=tiny_llama(), args=training_args(tmp_path), train_dataset=dataset())
    callback = attach_perturber(trainer, recorder)
    trainer.train()
    assert [step for step, _, _ in recorder.seen] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert callback.handle is None
    trainer.model.train()
    recorder.seen.clear()
    trainer.model(**{k: torch.tensor(v[:2]) for k, v in dataset()[:2].items()})
    assert recorder.seen == []


class Explode(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise RuntimeError("exploded at step 2")


def test_hooks_are_gone_after_the_trainer_raises(tmp_path: Path):
    recorder = Recording(alpha=5.0)
    trainer = Trainer(model=tiny_llama(), args=training_args(tmp_path), train_dataset=dataset(),
                      callbacks=[Explode()])
    callback = attach_perturber(trainer, recorder)
    with pytest.raises(RuntimeError, match="exploded"):
        trainer.train()
    assert callback.handle is None
    count = len(recorder.seen)
    trainer.model.train()
    trainer.model(**{k: torch.tensor(v) for k, v in dataset()[:2].items()})
    assert len(recorder.seen) == count


def test_a_resumed_run_draws_the_same_noise_as_an_uninterrupted_one(tmp_path: Path):
    whole = Recording(alpha=5.0)
    args = training_args(tmp_path / "whole", save_strategy="steps", save_steps=2)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=dataset())
    trainer.add_callback(PerturberCallback(whole))
    trainer.train()

    resumed = Recording(alpha=5.0)
    trainer = Trainer(model=tiny_llama(seed=9), args=args, train_dataset=dataset())
    trainer.add_callback(PerturberCallback(resumed))
    trainer.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))

    assert [step for step, _, _ in resumed.seen] == [2, 2, 3, 3]
    for (step, lengths, noise), (step2, lengths2, noise2) in zip(whole.seen[4:], resumed.seen,
                                                               strict=True):
        assert step == step2
        assert torch.equal(lengths, lengths2)
        assert torch.equal(noise, noise2)
    assert not torch.equal(whole.seen[0][2], whole.seen[1][2]), "micro-batches draw afresh"


def test_builtin_neftune_and_a_perturber_together_are_refused(tmp_path: Path):
    trainer = Trainer(model=tiny_llama(), args=training_args(tmp_path, neftune_noise_alpha=5.0),
                      train_dataset=dataset())
    attach_perturber(trainer, PERTURBERS.create("neftune"))
    with pytest.raises(PerturberError, match="neftune_noise_alpha"):
        trainer.train()


def test_trl_sft_trainer_padding_free_rows_are_scaled_per_segment(tmp_path: Path):
    from transformers import AutoTokenizer

    trl = pytest.importorskip("trl")  # the bench extra; CI installs it
    SFTConfig, SFTTrainer = trl.SFTConfig, trl.SFTTrainer

    from sft_plugins.assets import LLAMA3_TOKENIZER_DIR

    rows = [{"input_ids": list(range(1, 1 + n))} for n in (5, 3, 7, 2)]
    recorder = Recording(alpha=5.0)
    config = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                       padding_free=True, max_length=None, report_to="none", use_cpu=True,
                       save_strategy="no", disable_tqdm=True, logging_strategy="no", seed=3,
                       dataset_kwargs={"skip_prepare_dataset": True})
    trainer = SFTTrainer(model=tiny_llama(), args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(LLAMA3_TOKENIZER_DIR))
    callback = attach_perturber(trainer, recorder)
    trainer.train()
    assert callback.handle is None
    assert len(recorder.seen) == 2
    for _, lengths, noise in recorder.seen:
        assert lengths.size(0) == 1  # one flattened row holding two examples
        first = int(lengths[0, 0])
        second = lengths.size(1) - first
        assert lengths[0].tolist() == [first] * first + [second] * second
        for segment, n in ((noise[0, :first], first), (noise[0, first:], second)):
            assert 0 < segment.abs().max() <= 5.0 / (n * 32) ** 0.5 * (1 + 1e-6)
