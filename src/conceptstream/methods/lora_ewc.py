"""LoRA EWC: EWC on the adapter with the Fisher from the plain denoising loss (paper baseline)."""

from conceptstream.methods.registry import register
from conceptstream.methods.regularised import RegularisedAdapterMethod


@register
class LoRAEWC(RegularisedAdapterMethod):
    name = "lora-ewc"
    ewc_source = "denoise"
