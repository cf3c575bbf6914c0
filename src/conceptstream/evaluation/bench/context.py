"""What every run of one bench shares: settings, data, feature extractor, evaluator, model and generation records."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from conceptstream.evaluation.bench.data import BenchData


@dataclass
class BenchContext:
    settings: Any  # BenchSettings
    data: BenchData
    extractor: Any  # FeatureExtractor
    evaluator: Any  # scoring.Evaluator
    model_info: dict[str, str]  # {"reference", "fingerprint"}
    sampler: str  # the pipeline's scheduler class name
    log: Callable[[str], None]

    def generation_settings(self) -> dict[str, Any]:
        """How every image is generated (part of each run's config: other values are another experiment)."""
        s = self.settings
        return {"prompt": "a photo of a <token> NOUN (C-LoRA, trained without the noun: a photo of a <token>)",
                "contexts": list(s.contexts), "images_per_prompt": s.images_per_prompt,
                "images_per_concept": s.images_per_prompt * (1 + len(s.contexts)),
                "seeds": f"gen_seed + 1000 * prompt index + image index (gen_seed={s.gen_seed})",
                "sampler": self.sampler, "steps": s.ddim_steps, "guidance": s.guidance}
