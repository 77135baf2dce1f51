"""ShareGPT data as the tools that publish it mean it: `conversations` of `{"from": ..., "value": ...}` turns whose
roles are `human`, `gpt` and `system` (FastChat, LLaMA-Factory, axolotl), converted to `messages` of the roles a chat
template renders.

TRL's `maybe_convert_to_chatml` renames `from`/`value` to `role`/`content` but keeps the values, so a chat template
renders `<|im_start|>human` and `<|im_start|>gpt`, and `assistant_only_loss` finds no assistant turn. The roles are
mapped here, before TRL sees the data, as LLaMA-Factory and axolotl map them; a turn of any other role stops the run
with the role's name and the fix.
"""

import pyarrow.compute as pc
from datasets import Dataset, IterableDataset
from trl.data_utils import is_conversational_from_value

from ..errors import InputError

# What each ShareGPT role is in a chat template (LLaMA-Factory: human, gpt, system, observation; axolotl and FastChat
# also write user, assistant, chatgpt and tool)
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "observation": "tool",
    "tool": "tool",
}


def sharegpt_to_messages(dataset, name: str):
    """`dataset` with ShareGPT `conversations` replaced by `messages` of mapped roles; any other dataset (and `None`)
    as it is. A dict of datasets is converted split by split."""
    if isinstance(dataset, dict):
        return {split: sharegpt_to_messages(part, f"{name}[{split!r}]") for split, part in dataset.items()}
    if not isinstance(dataset, Dataset | IterableDataset) or "conversations" not in (dataset.column_names or []):
        return dataset
    if not is_conversational_from_value(next(iter(dataset))):
        return dataset  # not ShareGPT turns: the format checks say what TRL reads
    if isinstance(dataset, Dataset):
        _check_roles(dataset, name)
    return dataset.map(_to_messages, fn_kwargs={"name": name}, remove_columns="conversations")


def _check_roles(dataset: Dataset, name: str) -> None:
    """Raise, naming the role and the first row that has it, if a turn's `from` is not in `ROLES`."""
    turns = dataset.select_columns(["conversations"]).with_format("arrow")[:].column(0).combine_chunks()
    roles = pc.struct_field(turns.flatten(), "from")
    unknown = sorted(set(pc.unique(roles).to_pylist()) - set(ROLES))
    if unknown:
        first_turn = pc.index(roles, unknown[0]).as_py()
        row = pc.sum(pc.less_equal(turns.offsets[1:], first_turn)).as_py() or 0
        raise _unknown_role(name, unknown, row)


def _to_messages(row: dict, name: str) -> dict:
    messages = []
    for turn in row["conversations"]:
        if turn["from"] not in ROLES:  # a streaming dataset, checked row by row
            raise _unknown_role(name, [turn["from"]], None)
        kept = {key: value for key, value in turn.items() if key not in ("from", "value")}
        messages.append({**kept, "role": ROLES[turn["from"]], "content": turn["value"]})
    return {"messages": messages}


def _unknown_role(name: str, roles: list, row: int | None) -> InputError:
    where = f" (first in row {row})" if row is not None else ""
    return InputError(
        f"`{name}` has ShareGPT turns from {', '.join(repr(role) for role in roles)}{where}, which no chat template "
        f"renders: the roles read are {', '.join(repr(role) for role in ROLES)}. Rename those turns' `from`, or "
        "convert the data to `messages` with the roles your chat template renders."
    )
