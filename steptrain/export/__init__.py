"""Export checkpoints to HF-format directories and PEFT adapters."""

from steptrain.export.hf import ExportError, export_checkpoint, rebuild_from_checkpoint

__all__ = ["ExportError", "export_checkpoint", "rebuild_from_checkpoint"]
