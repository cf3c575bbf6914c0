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
