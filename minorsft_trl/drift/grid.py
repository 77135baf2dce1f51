"""The grid of a method comparison: which methods, learning rates and seeds `minorsft-trl compare` runs, checked,
and the runs it plans (shared by `compare`, which runs them, and `report` and `verdict`, which name them)."""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from minorsft_trl.errors import InputError


class CompareError(InputError):
    """Bad input to the comparison, refused before any training."""


@dataclass(frozen=True)
class Method:
    label: str
    loss_type: str


METHODS = {
    "sft": Method("SFT", "nll"),
    "minor_sft": Method("Minor SFT", "minor_sft"),
    "sft_dpo": Method("SFT using DPO", "sft_dpo"),
    "asft": Method("ASFT", "asft"),
    "sft_kl": Method("SFT + KL", "sft_kl"),
    "iw_sft": Method("iw-SFT", "iw_sft"),
}
STEP_CONTROL = "step_control"
# The methods whose KL anchor's coefficient the grid can set (`--kl_coefs`) or steer to a budget
# (`--target_forward_kls`): each such method runs as one variant per value, `<method>-<tag><value>`
KL_METHODS = ("sft_kl", "asft")
VARIANT_TAGS = {"kl_coef": "kl_coef", "target_forward_kl": "budget"}  # setting: its tag in names and labels


class _Labels(dict):
    """Method -> its name in tables and plots; a variant's is its method's with the value it sets, e.g.
    `sft_kl-budget0.5` -> "SFT + KL, budget 0.5"."""

    def __missing__(self, method: str) -> str:
        base, setting, value = split_variant(method)
        if setting is None:
            raise KeyError(method)
        return f"{self[base]}, {VARIANT_TAGS[setting]} {value:g}"


LABELS = _Labels(
    {**{name: method.label for name, method in METHODS.items()}, STEP_CONTROL: "SFT at Minor SFT's mean step"}
)
# Set per run by the grid: a recipe override of these would be silently replaced
GRID_KEYS = {"loss_type": "--methods", "learning_rate": "--learning_rates", "seed": "--seeds", "data_seed": "--seeds"}
# ... and these where the grid has variants that set them
VARIANT_KEYS = {"kl_coef": "--kl_coefs", "target_forward_kl": "--target_forward_kls"}
GRID_FILE_KEYS = ("methods", "learning_rates", "seeds", "step_control", "method_settings", "kl_coefs",
                  "target_forward_kls")  # fmt: skip


def variant(method: str, setting: str, value: float) -> str:
    """The name of `method` run with `setting` (`kl_coef` or `target_forward_kl`) at `value`."""
    return f"{method}-{VARIANT_TAGS[setting]}{value:g}"


def split_variant(method: str) -> tuple[str, str | None, float | None]:
    """`(method, setting, value)` of a variant name, `(method, None, None)` of a plain one."""
    base, _, rest = method.partition("-")
    for setting, tag in VARIANT_TAGS.items():
        if rest.startswith(tag):
            return base, setting, float(rest.removeprefix(tag))
    return method, None, None


def base_method(method: str) -> str:
    """The method a variant runs (`sft_kl-budget0.5` -> `sft_kl`)."""
    return split_variant(method)[0]


def budget_of(method: str) -> float | None:
    """The budget a variant steers to, None for a method with a fixed coefficient."""
    _, setting, value = split_variant(method)
    return value if setting == "target_forward_kl" else None


@dataclass(frozen=True)
class Grid:
    """What to compare: methods x learning rates x seeds, plus the step-size control at `step_control` (Minor SFT
    learning rates). `method_settings` are recipe keys per method (`{"minor_sft": {"beta": 0.04}}`)."""

    methods: tuple[str, ...]
    learning_rates: tuple[float, ...]
    seeds: tuple[int, ...]
    step_control: tuple[float, ...] = ()
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def settings_of(self, method: str) -> dict[str, Any]:
        """The recipe keys of a method's runs: its `method_settings` (a variant: its method's), and what the variant
        sets (`kl_coef`, `target_forward_kl`)."""
        base, setting, value = split_variant(method)
        settings = {**self.method_settings.get(base, {}), **self.method_settings.get(method, {})}
        if setting is not None:
            settings[setting] = value
        return settings


@dataclass(frozen=True)
class Run:
    method: str
    learning_rate: float  # the grid's; the control trains at Minor SFT's mean step from it
    seed: int

    @property
    def name(self) -> str:
        """The run's place in the grid, which names its cache entry: known before the control's rate is."""
        return f"{self.method}-lr{self.learning_rate:g}-seed{self.seed}"

    def folder(self, trained_lr: float) -> str:
        """The run's folder under `runs/`, named by the learning rate it trains at, as the report names it."""
        return f"{self.method}-lr{trained_lr:.3g}-seed{self.seed}"


# ------------------------------------------------------------------ the grid


def make_grid(
    methods,
    learning_rates,
    seeds,
    step_control: Any = None,
    method_settings: dict | None = None,
    kl_coefs=None,
    target_forward_kls=None,
) -> Grid:
    """A checked `Grid`. `step_control`: None (on, at the largest learning rate, when both `sft` and `minor_sft` are
    compared), True/"on", False/"off", or the Minor SFT learning rate(s) to take the control at. `kl_coefs` and
    `target_forward_kls` run each KL method (`sft_kl`, `asft`) as a variant per value: fixed coefficients (without
    `kl_coefs`, the recipe's own) beside the budgets the coefficient is steered to."""
    methods = tuple(dict.fromkeys(methods))
    if not methods:
        raise CompareError(f"no method to compare: give --methods, some of {', '.join(METHODS)}.")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        hint = " (the step-size control is --step_control, not a method)" if STEP_CONTROL in unknown else ""
        raise CompareError(
            f"unknown method(s) {', '.join(map(repr, unknown))}{hint}: known ones are {', '.join(METHODS)}."
        )
    learning_rates = tuple(dict.fromkeys(_number(lr, "learning rate") for lr in learning_rates))
    if not learning_rates:
        raise CompareError("no learning rate: give --learning_rates (e.g. 2.5e-4 1e-3).")
    bad = [lr for lr in learning_rates if not (math.isfinite(lr) and lr > 0)]
    if bad:
        raise CompareError(f"a learning rate must be a number > 0, got {bad[0]!r}: fix --learning_rates.")
    seeds = tuple(dict.fromkeys(seeds))
    if not seeds:
        raise CompareError("zero seeds: give at least one with --seeds (3 or more for useful intervals, e.g. 0 1 2).")
    if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise CompareError(f"seeds must be integers, got {list(seeds)}: fix --seeds.")
    both = "sft" in methods and "minor_sft" in methods
    if step_control is None or step_control in (True, "on"):
        if step_control is not None and "minor_sft" not in methods:
            raise CompareError(
                "the step-size control needs minor_sft among the methods: add it, or turn it off (--step_control off)."
            )
        # The largest learning rate: where the brake pulls hardest, so the control differs most from plain SFT
        controls = (max(learning_rates),) if both or step_control is not None else ()
    elif step_control in (False, "off"):
        controls = ()
    else:
        values = step_control if isinstance(step_control, list | tuple) else [step_control]
        controls = tuple(dict.fromkeys(_number(v, "step_control") for v in values))
        if "minor_sft" not in methods:
            raise CompareError(
                "the step-size control needs minor_sft among the methods: add it, or turn it off (--step_control off)."
            )
        missing = [lr for lr in controls if lr not in learning_rates]
        if missing:
            raise CompareError(
                f"step_control at learning rate {missing[0]:g}, where minor_sft does not run: give one "
                f"of the learning rates {[f'{lr:g}' for lr in learning_rates]}, or on/off."
            )
    methods = _with_variants(methods, kl_coefs, target_forward_kls)
    method_settings = dict(method_settings or {})
    for method, settings in method_settings.items():
        if method not in METHODS and method != STEP_CONTROL and method not in methods:
            raise CompareError(
                f"method_settings names an unknown method {method!r}: known ones are {', '.join(METHODS)}"
                + "".join(f", {m}" for m in methods if m not in METHODS)
                + "."
            )
        if not isinstance(settings, dict):
            raise CompareError(
                f"method_settings.{method} must be a mapping of recipe keys (e.g. beta: 0.04), got {settings!r}."
            )
        fixed = sorted(set(settings) & set(GRID_KEYS))
        if fixed:
            raise CompareError(
                f"method_settings.{method} sets {fixed[0]}, which the grid sets per run: use {GRID_KEYS[fixed[0]]}."
            )
        varied = sorted(key for key in set(settings) & set(VARIANT_KEYS) if key in set_by_variants(methods))
        if varied and base_method(method) in KL_METHODS:
            raise CompareError(
                f"method_settings.{method} sets {varied[0]}, which {VARIANT_KEYS[varied[0]]} sets per run: give "
                f"the values there."
            )
    return Grid(methods, learning_rates, seeds, controls, method_settings)


def set_by_variants(methods) -> set[str]:
    """The recipe keys the grid's variants set per run (`kl_coef`, `target_forward_kl`)."""
    return {setting for method in methods for setting in [split_variant(method)[1]] if setting is not None}


def _with_variants(methods: tuple[str, ...], kl_coefs, target_forward_kls) -> tuple[str, ...]:
    """`methods` with each KL method replaced by its variants: one per fixed coefficient, then one per budget."""
    if kl_coefs is None and target_forward_kls is None:
        return methods
    option = "--kl_coefs" if kl_coefs is not None else "--target_forward_kls"
    if not any(m in KL_METHODS for m in methods):
        raise CompareError(
            f"{option} sets the KL anchor's coefficient of {' or '.join(KL_METHODS)}, and none is among the methods "
            f"({', '.join(methods)}): add sft_kl to --methods."
        )
    coefs = tuple(dict.fromkeys(_number(c, "a kl_coef") for c in kl_coefs or ()))
    bad = [c for c in coefs if not (math.isfinite(c) and c >= 0)]
    if bad:
        raise CompareError(f"a kl_coef must be a number >= 0, got {bad[0]!r}: fix --kl_coefs.")
    budgets = tuple(dict.fromkeys(_number(b, "a target_forward_kl") for b in target_forward_kls or ()))
    bad = [b for b in budgets if not (math.isfinite(b) and b > 0)]
    if bad:
        raise CompareError(
            f"a target_forward_kl must be a number > 0 (nats per token of eval_forward_kl), got {bad[0]!r}: fix "
            "--target_forward_kls."
        )
    expanded = []
    for method in methods:
        if method not in KL_METHODS:
            expanded.append(method)
            continue
        fixed = [variant(method, "kl_coef", c) for c in coefs] if coefs else [method]
        expanded += fixed + [variant(method, "target_forward_kl", b) for b in budgets]
    return tuple(expanded)


def _number(value, what: str) -> float:
    if isinstance(value, bool):
        raise CompareError(f"{what} must be a number, got {value!r}.")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CompareError(f"{what} must be a number, got {value!r}.") from None


def read_grid_file(path: str) -> dict:
    """The keys of a `--grid` YAML file (`methods`, `learning_rates`, `seeds`, `step_control`, `method_settings`)."""
    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise CompareError(f"--grid {path!r} cannot be read: {error}") from error
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise CompareError(f"--grid {path!r} must be a mapping with keys {', '.join(GRID_FILE_KEYS)}.")
    unknown = sorted(set(values) - set(GRID_FILE_KEYS))
    if unknown:
        raise CompareError(
            f"--grid {path!r} has unknown key(s) {unknown}: the keys are {', '.join(GRID_FILE_KEYS)} "
            "(recipe keys go in the recipe, or on the command line)."
        )
    for key in ("methods", "learning_rates", "seeds", "kl_coefs", "target_forward_kls"):
        if key in values and not isinstance(values[key], list):
            values[key] = [values[key]]
    return values


def plan(grid: Grid) -> list[Run]:
    """Every run, the controls last: they need the mean weight of Minor SFT's runs."""
    runs = [Run(m, lr, s) for m in grid.methods for lr in grid.learning_rates for s in grid.seeds]
    return runs + [Run(STEP_CONTROL, lr, s) for lr in grid.step_control for s in grid.seeds]
