"""Sequential LoRA: keep training one adapter, no regularisation (the forgetting baseline)."""

from conceptstream.methods.registration import register
from conceptstream.methods.regularised import RegularisedAdapterMethod


@register
class SequentialLoRA(RegularisedAdapterMethod):
    name = "lora"
    supports_joint = True  # the bench's joint bound trains all concepts together with this loss
    # The winner of its equal tuning grid on tabletop-6's val views (benchmarks/results/tuning/, docs/DEFAULTS.md)
    adapter_lr = {"lora": 3e-4}
    defaults = {"token_lr": 2e-3}
