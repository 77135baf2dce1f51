"""Checkpoints that say when they are complete, so a run killed while saving never resumes from a half-written one.

Transformers writes `checkpoint-<step>/` file by file and picks the highest step as the latest. Once a checkpoint
is fully written, `mark_complete` adds a manifest of its files (written to a temporary name, then renamed: the
manifest exists whole or not at all), and `last_complete_checkpoint` only considers checkpoints whose manifest matches
their files.
"""

import json
import os
import re
from pathlib import Path

import transformers
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .errors import InputError

MANIFEST = "minorsft_complete.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")

logger = transformers.utils.logging.get_logger(__name__)


def mark_complete(checkpoint: str | Path) -> None:
    checkpoint = Path(checkpoint)
    files = {
        str(path.relative_to(checkpoint)): path.stat().st_size
        for path in sorted(checkpoint.rglob("*"))
        if path.is_file() and not path.name.startswith(MANIFEST)
    }
    staging = checkpoint / f"{MANIFEST}.partial"
    staging.write_text(json.dumps(files, indent=1))
    os.replace(staging, checkpoint / MANIFEST)


def has_manifest(checkpoint: str | Path) -> bool:
    return (Path(checkpoint) / MANIFEST).is_file()


def is_complete(checkpoint: str | Path) -> bool:
    """Whether `checkpoint` has a manifest and still holds every file it lists, at the size it was written."""
    checkpoint = Path(checkpoint)
    try:
        files = json.loads((checkpoint / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return bool(files) and all(
        (checkpoint / name).is_file() and (checkpoint / name).stat().st_size == size for name, size in files.items()
    )


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The complete checkpoint with the highest step in `output_dir`, or `None`."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = {
        int(match.group(1)): path
        for path in output_dir.iterdir()
        if path.is_dir() and (match := _CHECKPOINT.fullmatch(path.name))
    }
    return next((str(steps[step]) for step in sorted(steps, reverse=True) if is_complete(steps[step])), None)


RUN_IDENTITY = "minorsft_run.json"


def write_run_identity(checkpoint: str | Path, identity: dict) -> None:
    """Record what a checkpoint belongs to (loss type and settings, model, reference fingerprint, adapter, data),
    before it is marked complete."""
    (Path(checkpoint) / RUN_IDENTITY).write_text(json.dumps(identity, indent=1, sort_keys=True))


def check_run_identity(checkpoint: str | Path, identity: dict) -> None:
    """Refuse to resume from a checkpoint of another run: another loss type or loss settings (`beta`), another model
    or reference, another adapter (rank, targets), or other training data (adapters of equal shapes would load
    silently and stitch two runs together; others fail deep in torch). Say what is resumed."""
    try:
        recorded = json.loads((Path(checkpoint) / RUN_IDENTITY).read_text())
    except (OSError, ValueError):
        logger.warning(
            f"The checkpoint {str(checkpoint)!r} does not record which model and loss type it belongs to (written by "
            "another trainer or an older version): resuming without checking that it continues this run."
        )
        return
    differences = []
    if recorded.get("loss_type") != identity["loss_type"]:
        differences.append(
            f"it was trained with loss_type={recorded.get('loss_type')!r}, this run has {identity['loss_type']!r}"
        )
    if recorded.get("reference") != identity["reference"]:
        differences.append(
            f"it was trained from other weights ({recorded.get('model')!r}, fingerprint "
            f"{str(recorded.get('reference'))[:12]}) than this run's ({identity['model']!r}, "
            f"{identity['reference'][:12]})"
        )
    # Recorded since the second version of this file: older checkpoints are compared on the above only
    if "settings" in recorded and recorded["settings"] != identity["settings"]:
        there, here = recorded["settings"], identity["settings"]
        # A setting only one of them has (`ref_top_k`: the precomputed anchor against the exact one) reads as None
        changed = ", ".join(
            f"{name}={there.get(name)!r} there, {here.get(name)!r} here"
            for name in [*here, *(name for name in there if name not in here)]
            if there.get(name) != here.get(name)
        )
        differences.append(f"its loss settings differ ({changed})")
    if "adapter" in recorded and recorded["adapter"] != identity["adapter"]:
        changed = _changed_entries(recorded["adapter"] or {}, identity["adapter"] or {})
        differences.append(f"its adapter differs ({changed})")
    if recorded.get("data") is not None and identity.get("data") is not None and recorded["data"] != identity["data"]:
        differences.append("it was trained on other data (the tokenised training examples differ)")
    if differences:
        raise InputError(
            f"resume_from_checkpoint={str(checkpoint)!r} belongs to another run: {'; '.join(differences)}. Resume "
            "with the model, data and settings the checkpoint was trained with, or drop `resume_from_checkpoint` "
            "(or use another `output_dir`) to start a new run."
        )
    logger.warning(
        f"Resuming from {str(checkpoint)!r}: the same loss ({identity['loss_type']}"
        + "".join(f", {name}={value}" for name, value in identity["settings"].items())
        + "), model, reference, adapter and data as this run."
    )


def _changed_entries(before: dict, after: dict) -> str:
    keys = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
    return ", ".join(f"{key}={before.get(key)!r} there, {after.get(key)!r} here" for key in keys)


def resolve_resume(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | bool | None:
    """The checkpoint `Trainer.train` resumes from, only a complete one: `True` (or `"true"`, `"latest"`, as a recipe
    passes it) becomes the last checkpoint of `output_dir` whose files were all written; an incomplete one is
    refused."""
    if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() in ("true", "latest"):
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise InputError(
                f"resume_from_checkpoint: there is no complete checkpoint in {output_dir!r}. Drop "
                "`resume_from_checkpoint` to start from scratch, or pass the path of a checkpoint."
            )
        return checkpoint
    if (
        isinstance(resume_from_checkpoint, str)
        and has_manifest(resume_from_checkpoint)
        and not is_complete(resume_from_checkpoint)
    ):
        raise InputError(
            f"resume_from_checkpoint={resume_from_checkpoint!r} is incomplete (killed while saving, or files "
            f"removed since). The last complete one is {last_complete_checkpoint(output_dir)!r}."
        )
    return resume_from_checkpoint


def complete_and_rotate(run_dir: str, state, identity: dict, save_total_limit: int | None) -> None:
    """Once every process has written its part of the checkpoint of `state.global_step`: record what it belongs to,
    mark it complete, and only then delete old checkpoints (`save_total_limit`), so that a run killed at any point
    keeps a complete checkpoint it had before."""
    checkpoint = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
    write_run_identity(checkpoint, identity)
    mark_complete(checkpoint)
    rotate_checkpoints(
        output_dir=run_dir,
        save_total_limit=save_total_limit,
        best_model_checkpoint=state.best_model_checkpoint,
        use_mtime=True,
    )
