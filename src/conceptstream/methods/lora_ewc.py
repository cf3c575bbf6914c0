"""LoRA EWC: EWC on the adapter with the Fisher from the plain denoising loss (paper baseline)."""

from conceptstream.methods.config import EWCConfig, TrainConfig
from conceptstream.methods.registration import register
from conceptstream.methods.regularised import RegularisedAdapterMethod


@register
class LoRAEWC(RegularisedAdapterMethod):
    name = "lora-ewc"
    ewc_source = "denoise"
    configs = (TrainConfig, EWCConfig)
    # The winner of its equal tuning grid on tabletop-6's val views (benchmarks/results/tuning/, docs/DEFAULTS.md):
    # the rate decides (lambda 10-1000 tie within 0.1 A_MMD at every rate)
    adapter_lr = {"lora": 3e-3}
    defaults = {"ewc_lambda": 1000.0}
