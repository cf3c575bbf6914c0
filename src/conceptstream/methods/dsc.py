"""The DSC methods: sequential adapter training with Diffusion Scores Consolidation after each task
(alone, with EWC, or with EWC-DC); the consolidation phase is :mod:`conceptstream.methods.consolidation`."""

from __future__ import annotations

from conceptstream.methods.config import DCScoresConfig, DCTermConfig, DSCConfig, EWCConfig, TrainConfig
from conceptstream.methods.registration import register
from conceptstream.methods.regularised import RegularisedAdapterMethod


@register
class DSC(RegularisedAdapterMethod):
    name = "dsc"
    use_dsc = True
    configs = (TrainConfig, DCScoresConfig, DSCConfig)
    # The winner of its equal tuning grid on tabletop-6's val views (benchmarks/results/tuning/, docs/DEFAULTS.md)
    adapter_lr = {"lora": 1e-3}
    defaults = {"dsc_iters": 10}


@register
class DSCEWC(RegularisedAdapterMethod):
    name = "dsc-ewc"
    use_dsc = True
    ewc_source = "denoise"
    configs = (TrainConfig, EWCConfig, DCScoresConfig, DSCConfig)
    # The winner of its equal tuning grid on tabletop-6's val views (benchmarks/results/tuning/, docs/DEFAULTS.md)
    adapter_lr = {"lora": 3e-3}
    defaults = {"dsc_iters": 100}


@register
class DSCEWCDC(RegularisedAdapterMethod):
    name = "dsc-ewc-dc"
    use_dsc = True
    ewc_source = "dc"
    use_dc_term = True
    configs = (TrainConfig, EWCConfig, DCTermConfig, DCScoresConfig, DSCConfig)
    # The winner of its equal tuning grid on tabletop-6's val views (benchmarks/results/tuning/, docs/DEFAULTS.md)
    adapter_lr = {"lora": 3e-4}
    defaults = {"dsc_iters": 10, "token_lr": 2e-2}  # token_lr: its token-rate round
