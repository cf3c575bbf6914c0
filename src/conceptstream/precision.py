"""The mixed-precision modes a training run may ask for (torch-free, so the CLI parser can list them).

``"no"`` trains in fp32; ``"bf16"``/``"fp16"`` autocast the forward passes through accelerate while
weights, optimizer state and the loss stay fp32. fp16 needs a gradient scaler, which the engine's
loop has (``distributed.make_accelerator``) and ``world train-base``'s loop does not, so base-model
training offers only :data:`BASE_TRAINING_PRECISIONS`.
"""

from __future__ import annotations

PRECISIONS = ("no", "bf16", "fp16")
BASE_TRAINING_PRECISIONS = ("no", "bf16")
