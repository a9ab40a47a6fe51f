"""Collators that read the template's spans: which assistant turns carry loss."""

from __future__ import annotations

from typing import Any

from sft_plugins.masking import (
    MaskingCollator,
    RenderedExample,
    SkipExample,
    WeightedSpan,
    Weighting,
)


def _spans(spans: list[tuple[int, int]], weight: float = 1.0) -> tuple[WeightedSpan, ...]:
    return tuple(WeightedSpan(start, end, weight) for start, end in spans)


def _assistant_spans(example: RenderedExample) -> list[tuple[int, int]]:
    spans = example.assistant_spans
    if not spans:
        raise SkipExample("no_assistant_turn", "has no assistant turn to train on")
    return spans


class CompletionOnly(MaskingCollator):
    """Loss on the completion and its end-of-turn token only (prompt/completion data).

    Nothing of the prompt, the assistant header the template puts before the completion, or the
    pads is trained. For plain-text prompt/completion the example is
    ``prompt + completion + eos`` and the completion span covers the completion and the eos; a
    token that straddles the boundary is trained. Assistant messages of a multi-message
    completion are trained; tool results inside it are not (the model does not produce them).
    """

    name = "completion-only"
    aliases = ("completion_only", "completions")

    def weigh(self, example: RenderedExample) -> Weighting:
        if not example.has_completion:
            raise SkipExample("not_prompt_completion",
                              "is not prompt/completion data; completion-only needs 'prompt' "
                              "and 'completion' fields (use assistant-only or last-turn for "
                              "'messages')")
        spans = example.completion_spans
        if not spans:
            raise SkipExample("no_assistant_turn", "has no assistant message in its completion")
        return Weighting(_spans(spans))


class AssistantOnly(MaskingCollator):
    """Loss on every assistant turn's content and end-of-turn token (multi-turn data).

    Headers, system, user and tool messages, and pads carry no loss.
    """

    name = "assistant-only"
    aliases = ("assistant_only", "assistant")

    def weigh(self, example: RenderedExample) -> Weighting:
        return Weighting(_spans(_assistant_spans(example)))


class LastTurn(MaskingCollator):
    """Loss on the final assistant turn only; earlier answers are context."""

    name = "last-turn"
    aliases = ("last_turn", "last")

    def weigh(self, example: RenderedExample) -> Weighting:
        return Weighting(_spans(_assistant_spans(example)[-1:]))


class AllTokens(MaskingCollator):
    """Loss on every real token (pads excluded): the language-modelling baseline."""

    name = "all-tokens"
    aliases = ("all_tokens", "all")

    def weigh(self, example: RenderedExample) -> Weighting:
        if not example.text:
            raise SkipExample("empty_text", "has an empty text")
        return Weighting((WeightedSpan(0, len(example.text)),))


class PromptWeighted(MaskingCollator):
    """Assistant turns weigh 1, every other real token ``prompt_loss_weight`` (default 0.1).

    After Huerta-Enochian & Ko 2024, "Instruction Fine-Tuning: Does Prompt Loss Matter?", who
    found weights of 0.01-0.1 best for short completions. Weights strictly between 0 and 1 reach
    the loss through the ``loss_weights`` column, which the sft-plugins trainer reads.
    """

    name = "prompt-weighted"
    aliases = ("prompt_weighted", "prompt-loss-weight")

    def __init__(self, *, prompt_loss_weight: float = 0.1, **options: Any) -> None:
        super().__init__(**options)
        if not 0.0 <= prompt_loss_weight <= 1.0:
            raise self._option_error("prompt_loss_weight", prompt_loss_weight,
                                     "a number in [0, 1]")
        self.prompt_loss_weight = float(prompt_loss_weight)

    @property
    def weighted(self) -> bool:
        return self.prompt_loss_weight not in (0.0, 1.0)

    def weigh(self, example: RenderedExample) -> Weighting:
        return Weighting(_spans(_assistant_spans(example)), background=self.prompt_loss_weight)
