"""EWC-DC (the paper's parameter-space method): Fisher from DC log-likelihoods + the DC term."""

from conceptstream.methods.config import DCScoresConfig, DCTermConfig, EWCConfig, TrainConfig
from conceptstream.methods.registration import register
from conceptstream.methods.regularised import RegularisedAdapterMethod


@register
class EWCDC(RegularisedAdapterMethod):
    name = "ewc-dc"
    ewc_source = "dc"
    use_dc_term = True
    configs = (TrainConfig, EWCConfig, DCTermConfig, DCScoresConfig)
    # The winner of its equal tuning grid on tabletop-6's val views (benchmarks/results/tuning/, docs/DEFAULTS.md)
    adapter_lr = {"lora": 3e-4}
    defaults = {"ewc_lambda": 10.0, "token_lr": 2e-2}  # token_lr: its token-rate round
