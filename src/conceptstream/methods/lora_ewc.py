"""LoRA EWC: EWC on the adapter with the Fisher from the plain denoising loss (paper baseline)."""

from conceptstream.methods.config import EWCConfig, TrainConfig
from conceptstream.methods.registration import register
from conceptstream.methods.regularised import RegularisedAdapterMethod


@register
class LoRAEWC(RegularisedAdapterMethod):
    name = "lora-ewc"
    ewc_source = "denoise"
    configs = (TrainConfig, EWCConfig)
