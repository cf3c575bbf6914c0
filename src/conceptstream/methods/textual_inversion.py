"""Textual Inversion (Gal et al. 2023), run sequentially: only the new token is learned.

Nothing else changes, so nothing is forgotten, but little can be learned: the lower bound on
plasticity that the adapter methods are compared against.
"""

from conceptstream.methods.base import ContinualMethod
from conceptstream.methods.config import TrainConfig
from conceptstream.methods.registration import register


@register
class TextualInversion(ContinualMethod):
    name = "textual-inversion"
    uses_adapter = False
    configs = (TrainConfig,)  # lr is unused (nothing but the token trains) and kept for older manifests
    # The winner of its equal tuning grid on tabletop-6's val views (benchmarks/results/tuning/, docs/DEFAULTS.md):
    # only a token learns, so it gets its own budget; at 200 steps it barely learned
    defaults = {"token_lr": 2e-3}
    default_steps = 1000
