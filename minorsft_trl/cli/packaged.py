"""The recipes and accelerate configs shipped with the package, found by name.

The files are kept once, at the repository's top level (`recipes/<Model>/<method>/config_*.yaml`,
`recipes/chat_templates/`, `accelerate_configs/*.yaml`); the wheel ships them as `minorsft_trl/recipes` and
`minorsft_trl/accelerate_configs` (see `pyproject.toml`). A recipe's name is its path under `recipes/` without
`.yaml`, e.g. `SmolLM2-135M-Instruct/minor_sft/config_lora`.
"""

from pathlib import Path

from ..errors import InputError

_PACKAGE = Path(__file__).resolve().parents[1]  # minorsft_trl
RECIPE_GLOB = "*/*/config_*.yaml"


def _data_dir(name: str) -> Path:
    """`minorsft_trl/<name>` in an installed wheel, `<repository>/<name>` in a source checkout (editable install)."""
    installed = _PACKAGE / name
    return installed if installed.is_dir() else _PACKAGE.parent / name


def recipes_dir() -> Path:
    return _data_dir("recipes")


def accelerate_configs_dir() -> Path:
    return _data_dir("accelerate_configs")


def recipe_names() -> list[str]:
    return sorted(
        path.relative_to(recipes_dir()).with_suffix("").as_posix() for path in recipes_dir().glob(RECIPE_GLOB)
    )


def accelerate_config_names() -> list[str]:
    return sorted(path.stem for path in accelerate_configs_dir().glob("*.yaml"))


def find_recipe(name: str) -> Path:
    """A recipe file: `name` itself if it is a file, else the packaged recipe of that name (`.yaml` and a leading
    `recipes/` optional, so the repository paths of the README work from any directory)."""
    if Path(name).is_file():
        return Path(name)
    key = name.removeprefix("recipes/").removesuffix(".yaml")
    if key not in recipe_names():
        raise InputError(
            f"Recipe {name!r} is neither a file nor a packaged recipe. Packaged recipes (`minorsft-trl recipes`): "
            f"{', '.join(recipe_names())}."
        )
    return recipes_dir() / f"{key}.yaml"


def resolve_config_argument(args: list[str]) -> list[str]:
    """`args` with the value of `--config` made a file path (see `find_recipe`)."""
    if "--config" not in args or args.index("--config") + 1 >= len(args):
        return list(args)  # no recipe, or no value: the parser reports it
    index = args.index("--config") + 1
    return [*args[:index], str(find_recipe(args[index])), *args[index + 1 :]]


def find_accelerate_config(name: str) -> str:
    """`name` itself if it is a file, else the packaged accelerate config of that name (`ddp`, `fsdp`, ...) if there is
    one, else `name` unchanged (TRL's own configs, `fsdp2`, `multi_gpu`, `zero1`, ..., are looked up next)."""
    if Path(name).is_file() or name not in accelerate_config_names():
        return name
    return str(accelerate_configs_dir() / f"{name}.yaml")


def resolve_recipe_file(path: str) -> str:
    """A file a recipe names relative to the repository root (`chat_template_path: recipes/chat_templates/...`): as
    given if it exists from the current directory, else the packaged copy if there is one."""
    if not path.startswith("recipes/") or Path(path).exists():
        return path
    packaged = recipes_dir() / path.removeprefix("recipes/")
    return str(packaged) if packaged.is_file() else path
