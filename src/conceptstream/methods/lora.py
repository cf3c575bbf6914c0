"""Sequential LoRA: keep training one adapter, no regularisation (the forgetting baseline)."""

from conceptstream.methods.registration import register
from conceptstream.methods.regularised import RegularisedAdapterMethod


@register
class SequentialLoRA(RegularisedAdapterMethod):
    name = "lora"
    supports_joint = True  # the bench's joint bound trains all concepts together with this loss
