"""`minorsft_trl.embedded.resolve_model`, the documented import of the embedded default model's resolver; its code is
`minorsft_trl.data.embedded`."""

from .data.embedded import resolve_model

__all__ = ["resolve_model"]
