"""The token ids the drift measures score: prompts for the reference to continue, and general text."""

from pathlib import Path

from datasets import Dataset, DatasetDict, IterableDataset, load_dataset, load_from_disk

from ..data import _missing_path, check_folder, file_builder, is_saved_dataset, looks_like_path

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
    """The first `count` prompts of the dataset `name`: a `prompt` column (text, or a conversation ended by a user
    turn) or a `messages` column (each conversation up to its last assistant turn), rendered by the chat template."""
    dataset = _first_rows(load_drift_dataset(name, "drift_prompts"), count)
    if "prompt" in dataset.column_names:
        prompts = dataset["prompt"]
    elif "messages" in dataset.column_names:
        prompts = [_before_last_assistant_turn(m) for m in dataset["messages"]]
    else:
        raise ValueError(
            f"drift_prompts {name!r} has the columns {dataset.column_names}: give it a `prompt` column (text or a "
            "conversation) or a `messages` column."
        )
    return [_token_ids(tokenizer, p, add_generation_prompt=True) for p in prompts]


def text_ids_from_dataset(name: str, tokenizer, count: int, max_length: int | None) -> list[list[int]]:
    """The token ids of the first `count` texts of the dataset `name` (a `text` column, or `messages` rendered by the
    chat template), each cut to `max_length` tokens; texts of fewer than 2 tokens are refused."""
    dataset = _first_rows(load_drift_dataset(name, "drift_text_dataset"), count)
    if "text" in dataset.column_names:
        texts = dataset["text"]
    elif "messages" in dataset.column_names:
        texts = dataset["messages"]
    else:
        raise ValueError(
            f"drift_text_dataset {name!r} has the columns {dataset.column_names}: give it a `text` column (or "
            "`messages`)."
        )
    ids = [_token_ids(tokenizer, t, add_generation_prompt=False)[:max_length] for t in texts]
    short = [i for i, t in enumerate(ids) if len(t) < 2]
    if short:
        raise ValueError(
            f"drift_text_dataset {name!r}: rows {short[:5]} have fewer than 2 tokens, which leaves nothing to score. "
            "Remove the empty texts."
        )
    return ids


def load_drift_dataset(name: str, where: str) -> Dataset:
    """The train split (or the only split) of a local file, a folder of files, a `save_to_disk` folder or a
    `datasets` name; an empty one is refused."""
    path = Path(name).expanduser()
    if path.is_file():
        loaded = load_dataset(file_builder(path, where), data_files=str(path))
    elif path.is_dir():
        if is_saved_dataset(path):
            loaded = load_from_disk(str(path))
        else:
            check_folder(path, where)
            loaded = load_dataset(str(path))
    elif looks_like_path(name):
        raise ValueError(_missing_path(name, where))
    else:
        loaded = load_dataset(name)
    if isinstance(loaded, DatasetDict):
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    if len(loaded) == 0:
        raise ValueError(f"{where} {name!r} has no rows: give it at least one.")
    return loaded


def _first_rows(dataset: Dataset, count: int) -> Dataset:
    return dataset.select(range(min(count, len(dataset))))


def _before_last_assistant_turn(messages: list[dict]) -> list[dict]:
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
    return messages[:last]


def _token_ids(tokenizer, value, add_generation_prompt: bool) -> list[int]:
    """A text as the tokenizer encodes it, or a conversation as the chat template renders it."""
    if isinstance(value, str):
        return tokenizer(value)["input_ids"]
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "A drift dataset holds conversations, but the tokenizer has no chat template. Set `chat_template_path`, "
            "or give plain text."
        )
    text = tokenizer.apply_chat_template(value, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
