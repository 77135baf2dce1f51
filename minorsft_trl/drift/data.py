"""The token ids the drift measures score: prompts for the reference to continue, and general text."""

from collections.abc import Iterator

import transformers
from datasets import Dataset, IterableDataset
from trl.data_utils import is_conversational, maybe_apply_chat_template

from ..data.sharegpt import sharegpt_to_messages
from ..data.sources import MinorSFTScriptArguments, load_named
from ..errors import InputError

logger = transformers.utils.logging.get_logger(__name__)

# Examples looked at for the eval split's prompts, per prompt asked for: rows whose answer starts at their first token
# are skipped, but a split of nothing else is not read to its end
_EXAMPLES_PER_PROMPT = 8


def prompt_ids_from_prepared(
    dataset: Dataset | IterableDataset,
    count: int,
    max_length: int | None,
    conversation_prompts: list[list[int]] | None = None,
) -> list[list[int]]:
    """The prompts of the first `count` examples of a dataset prepared by `SFTTrainer`: each example's tokens before
    its answer, per example in packed rows (`seq_lengths`).

    The answer starts at the first token the example's `completion_mask` marks (prompt-completion data trained on
    every token keeps that column) or else at the first token its `labels` count (TRL 1.16 folds the completion and
    assistant masks into `labels`). Where no example marks an answer after some prompt (every token trained on):
    `conversation_prompts`, if the raw split holds conversations (`prompt_ids_from_conversations`); else the first
    half of each example, for plain text, the one format without an answer to stop at."""
    prompts, unmarked = [], []
    for seen, example in enumerate(_prepared_examples(dataset)):
        if len(prompts) == count or seen == count * _EXAMPLES_PER_PROMPT:
            break
        start = _answer_start(example)
        if start > 0:
            prompts.append(example["input_ids"][:start])
        elif len(unmarked) < count:
            unmarked.append(example["input_ids"])
    if not prompts and conversation_prompts:
        prompts = conversation_prompts[:count]
    elif not prompts:
        logger.info(
            "The eval split marks no answer (every token is trained on, as in plain text): the drift measures' "
            "prompts are the first half of each of its first examples. Name prompts with `drift_prompts` to choose "
            "them."
        )
        prompts = [ids[: len(ids) // 2] for ids in unmarked if len(ids) >= 2]
    if not prompts:
        raise InputError(
            "The drift measures found no prompt in the eval dataset (no example has tokens before its answer). Name "
            "prompts with `drift_prompts`, or set eval_drift=False."
        )
    return [p[-max_length:] if max_length else p for p in prompts]


def _prepared_examples(dataset: Dataset | IterableDataset) -> Iterator[dict[str, list[int]]]:
    """The examples of a prepared dataset, one at a time: a packed row (`seq_lengths`) split into its examples."""
    for row in dataset:
        lengths = row.get("seq_lengths") or [len(row["input_ids"])]
        start = 0
        for length in lengths:
            yield {
                column: list(row[column][start : start + length])
                for column in ("input_ids", "labels", "completion_mask")
                if row.get(column) is not None
            }
            start += length


def _answer_start(example: dict[str, list[int]]) -> int:
    """The position of an example's first answer token (0 where none is marked after a prompt)."""
    if "completion_mask" in example:
        return next((i for i, counted in enumerate(example["completion_mask"]) if counted), 0)
    labels = example.get("labels", example["input_ids"])
    return next((i for i, label in enumerate(labels) if label != -100), 0)


def first_conversations(dataset, count: int) -> list[list[dict]] | None:
    """The `messages` of the first `count` rows of a raw (not yet prepared) dataset, or `None` if it holds no
    conversations."""
    if isinstance(dataset, dict):
        dataset = next(iter(dataset.values()), None)
    if not isinstance(dataset, Dataset | IterableDataset) or "messages" not in (dataset.column_names or []):
        return None
    return [row["messages"] for row, _ in zip(dataset, range(count), strict=False)]


def prompt_ids_from_conversations(conversations: list[list[dict]], tokenizer, count: int) -> list[list[int]]:
    """The turns before the first assistant turn of each of the first `count` conversations, rendered as TRL renders
    prompts (with the generation prompt)."""
    before = [_before_first_assistant_turn(messages) for messages in conversations[:count]]
    return [_token_ids(tokenizer, {"prompt": turns}, "prompt") for turns in before]


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
        raise InputError(
            f"drift_prompts {name!r} has the columns {dataset.column_names}: give it a `prompt` column (text or a "
            "conversation) or a `messages` column."
        )
    return [_token_ids(tokenizer, {"prompt": p}, "prompt") for p in prompts]


def text_ids_from_dataset(name: str, tokenizer, count: int, max_length: int | None) -> list[list[int]]:
    """The token ids of the first `count` texts of the dataset `name` (a `text` column, or `messages` rendered by the
    chat template), each cut to `max_length` tokens; texts of fewer than 2 tokens are refused."""
    dataset = load_drift_dataset(name, "drift_text_dataset", count)
    if not {"text", "messages"} & set(dataset.column_names):
        raise InputError(
            f"drift_text_dataset {name!r} has the columns {dataset.column_names}: give it a `text` column (or "
            "`messages`)."
        )
    key = "text" if "text" in dataset.column_names else "messages"
    ids = [_token_ids(tokenizer, {key: value}, "text")[:max_length] for value in dataset[key]]
    short = [i for i, t in enumerate(ids) if len(t) < 2]
    if short:
        raise InputError(
            f"drift_text_dataset {name!r}: rows {short[:5]} have fewer than 2 tokens, which leaves nothing to score. "
            "Remove the empty texts."
        )
    return ids


def load_drift_dataset(name: str, where: str, count: int) -> Dataset:
    """The first `count` rows of the train split (or the only split) of whatever `dataset_name` reads: a local file
    or folder, a `bigbench:` task, a `datasets` name; ShareGPT `conversations` become `messages` (`sharegpt`). An
    empty one is refused."""
    splits = load_named(MinorSFTScriptArguments(dataset_name=name), where=where)
    dataset = splits["train"] if "train" in splits else next(iter(splits.values()))
    if len(dataset) == 0:
        raise InputError(f"{where} {name!r} has no rows: give it at least one.")
    return sharegpt_to_messages(dataset.select(range(min(count, len(dataset)))), where)


def _before_first_assistant_turn(messages: list[dict]) -> list[dict]:
    first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), len(messages))
    return messages[:first]


def _before_last_assistant_turn(messages: list[dict]) -> list[dict]:
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
    return messages[:last]


def _token_ids(tokenizer, example: dict, rendered_key: str) -> list[int]:
    """A text as the tokenizer encodes it, or a conversation as TRL's `maybe_apply_chat_template` renders it (its
    special tokens written by the template, none added)."""
    if not is_conversational(example):
        return tokenizer(next(iter(example.values())))["input_ids"]
    if getattr(tokenizer, "chat_template", None) is None:
        raise InputError(
            "A drift dataset holds conversations, but the tokenizer has no chat template. Set `chat_template_path`, "
            "or give plain text."
        )
    text = maybe_apply_chat_template(example, tokenizer)[rendered_key]
    return tokenizer(text, add_special_tokens=False)["input_ids"]
