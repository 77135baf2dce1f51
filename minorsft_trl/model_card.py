"""The names in a run's model card and saved adapter, for a model or data that are not on the Hugging Face Hub.

TRL's model card links its base model and dataset as Hub ids: a local model reads "fine-tuned version of
[None](<Hub>/None)", a local data file is linked as a Hub dataset, the title is "Model Card for
None" and the quick start loads `model="None"`. PEFT writes the path the base model was loaded from into the adapter's
`base_model_name_or_path`: for the embedded model, a cache folder of this machine. Here the real Hub id is named where
there is one (the embedded models'), linked on the Hub the user's configuration names (`HF_ENDPOINT`), a local path
is named as a path, with no link.
"""

import json
import re
from pathlib import Path

from huggingface_hub import constants

from .cache import cache_root
from .data.embedded import EMBEDDED_MODELS

# The line of TRL's model card template that names the base model and the dataset
_FINE_TUNED_LINE = re.compile(r"^This model is a fine-tuned version of .*$", re.M)


def hub_id_of(model_path: str | None) -> str | None:
    """The Hub id of the model loaded from `model_path`: the embedded model's, for its converted folder; the path
    itself when it is not a local folder (a Hub id); `None` for any other local folder."""
    if not model_path:
        return None
    path = Path(model_path).expanduser()
    for name, embedded in EMBEDDED_MODELS.items():
        if path.exists() and path.resolve() == (cache_root() / "models" / name).resolve():
            return embedded.hub_id
    return None if path.exists() else model_path


def is_hub_dataset_id(name: str | None) -> bool:
    """Whether `name` reads as a Hub dataset id (`org/name` or `name`), not a local path or a `bigbench:` task."""
    return bool(name) and ":" not in name and not Path(name).expanduser().exists() and name.count("/") <= 1


def named_model_card(card: str, model_path: str, dataset_name: str | None, output_dir: str) -> str:
    """TRL's model card text with the base model and the dataset named as what they are (see the module docstring)."""
    base_id = hub_id_of(model_path)
    base = f"[{base_id}]({constants.ENDPOINT}/{base_id})" if base_id else f"the local model `{model_path}`"
    data = ""
    if dataset_name and is_hub_dataset_id(dataset_name):
        data = f" on the [{dataset_name}]({constants.ENDPOINT}/datasets/{dataset_name}) dataset"
    elif dataset_name:
        data = f" on `{dataset_name}`"
    card = _FINE_TUNED_LINE.sub(lambda _: f"This model is a fine-tuned version of {base}{data}.", card, count=1)
    card = card.replace('model="None"', f'model="{output_dir}"')
    return re.sub(r"^base_model: None$\n?", "" if base_id is None else f"base_model: {base_id}\n", card, flags=re.M)


def name_saved_adapters_base_model(output_dir: str) -> None:
    """Write the base model's Hub id, where it has one, into the `adapter_config.json` files PEFT saved in
    `output_dir` (one per adapter): their `base_model_name_or_path` is the folder the base was loaded from, for the
    embedded model a cache folder of this machine, which would load the adapter nowhere else. Only the saved file
    changes: while training, PEFT keeps reading the base from where it is."""
    for config_file in Path(output_dir).glob("**/adapter_config.json"):
        config = json.loads(config_file.read_text())
        hub_id = hub_id_of(config.get("base_model_name_or_path"))
        if hub_id is not None and hub_id != config["base_model_name_or_path"]:
            config["base_model_name_or_path"] = hub_id
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def rewrite_model_card(output_dir: str, model_path: str, dataset_name: str | None, drift_section: str | None) -> None:
    """The model card TRL wrote in `output_dir`, with its names made right (`named_model_card`) and the drift section
    (`minorsft_trl.drift.card`), if any, at its end."""
    path = Path(output_dir, "README.md")
    card = named_model_card(path.read_text(), model_path, dataset_name, output_dir)
    path.write_text(card + ("\n\n" + drift_section if drift_section is not None else ""))
