"""Atomic, resumable checkpoints."""

from steptrain.checkpoint.manager import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temporaries,
    resolve_resume,
    save_checkpoint,
)

__all__ = [
    "CheckpointError",
    "list_checkpoints",
    "load_checkpoint",
    "remove_stale_temporaries",
    "resolve_resume",
    "save_checkpoint",
]
