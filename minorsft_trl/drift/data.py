"""The token ids the drift measures score: prompts for the reference to continue, and general text."""

from datasets import Dataset, IterableDataset
from trl.data_utils import (
    is_conversational,
    is_conversational_from_value,
    maybe_apply_chat_template,
    maybe_convert_to_chatml,
)

from ..data import MinorSFTScriptArguments, load_named

# Columns of a prepared (tokenized) dataset that mark the tokens the loss counts, as SFTTrainer names them
LOSS_MASKS = ("completion_mask", "assistant_masks")


def prompt_ids_from_prepared(
    dataset: Dataset | IterableDataset, count: int, max_length: int | None
) -> list[list[int]]:
    """The prompts of the first `count` rows of a dataset prepared by `SFTTrainer`: the tokens before the first one
    the loss counts (the prompt of a prompt-completion example, the turns before the first assistant turn); for plain
    text, where every token counts, the first half of the row."""
    prompts = []
    for row in dataset:
        ids = list(row["input_ids"])
        mask = next((row[name] for name in LOSS_MASKS if row.get(name) is not None), None)
        start = next((i for i, counted in enumerate(mask) if counted), 0) if mask is not None else len(ids) // 2
        if start > 0:
            prompts.append(ids[:start])
        if len(prompts) == count:
            break
    if not prompts:
        raise ValueError(
            "The drift measures found no prompt in the eval dataset (no row has tokens before its answer). Name "
            "prompts with `drift_prompts`, or set eval_drift=False."
        )
    return [p[-max_length:] if max_length else p for p in prompts]


def prompt_ids_from_dataset(name: str, tokenizer, count: int) -> list[list[int]]:
    """The first `count` prompts of the dataset `name`: a `prompt` column (text, or a conversation) or a `messages`
    column (each conversation up to its last assistant turn), rendered as TRL renders prompts (a conversation ending
    with a user turn gets the generation prompt)."""
    dataset = load_drift_dataset(name, "drift_prompts", count)
    if "prompt" in dataset.column_names:
        prompts = dataset["prompt"]
    elif "messages" in dataset.column_names:
        prompts = [_before_last_assistant_turn(m) for m in dataset["messages"]]
    else:
        raise ValueError(
            f"drift_prompts {name!r} has the columns {dataset.column_names}: give it a `prompt` column (text or a "
            "conversation) or a `messages` column."
        )
    return [_token_ids(tokenizer, {"prompt": p}, "prompt") for p in prompts]


def text_ids_from_dataset(name: str, tokenizer, count: int, max_length: int | None) -> list[list[int]]:
    """The token ids of the first `count` texts of the dataset `name` (a `text` column, or `messages` rendered by the
    chat template), each cut to `max_length` tokens; texts of fewer than 2 tokens are refused."""
    dataset = load_drift_dataset(name, "drift_text_dataset", count)
    if not {"text", "messages"} & set(dataset.column_names):
        raise ValueError(
            f"drift_text_dataset {name!r} has the columns {dataset.column_names}: give it a `text` column (or "
            "`messages`)."
        )
    key = "text" if "text" in dataset.column_names else "messages"
    ids = [_token_ids(tokenizer, {key: value}, "text")[:max_length] for value in dataset[key]]
    short = [i for i, t in enumerate(ids) if len(t) < 2]
    if short:
        raise ValueError(
            f"drift_text_dataset {name!r}: rows {short[:5]} have fewer than 2 tokens, which leaves nothing to score. "
            "Remove the empty texts."
        )
    return ids


def load_drift_dataset(name: str, where: str, count: int) -> Dataset:
    """The first `count` rows of the train split (or the only split) of whatever `dataset_name` reads: a local file
    or folder, a `bigbench:` task, a `datasets` name; ShareGPT `conversations` become `messages`, as TRL converts
    them. An empty one is refused."""
    splits = load_named(MinorSFTScriptArguments(dataset_name=name), where=where)
    dataset = splits["train"] if "train" in splits else next(iter(splits.values()))
    if len(dataset) == 0:
        raise ValueError(f"{where} {name!r} has no rows: give it at least one.")
    dataset = dataset.select(range(min(count, len(dataset))))
    if is_conversational_from_value(dataset[0]):
        dataset = dataset.map(maybe_convert_to_chatml, remove_columns="conversations")
    return dataset


def _before_last_assistant_turn(messages: list[dict]) -> list[dict]:
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
    return messages[:last]


def _token_ids(tokenizer, example: dict, rendered_key: str) -> list[int]:
    """A text as the tokenizer encodes it, or a conversation as TRL's `maybe_apply_chat_template` renders it (its
    special tokens written by the template, none added)."""
    if not is_conversational(example):
        return tokenizer(next(iter(example.values())))["input_ids"]
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "A drift dataset holds conversations, but the tokenizer has no chat template. Set `chat_template_path`, "
            "or give plain text."
        )
    text = maybe_apply_chat_template(example, tokenizer)[rendered_key]
    return tokenizer(text, add_special_tokens=False)["input_ids"]
