"""Pure loss functions: tensors in, (loss, metrics) out. They import only torch."""

from steptrain.objectives.lm import lm_loss_sum

__all__ = ["lm_loss_sum"]
