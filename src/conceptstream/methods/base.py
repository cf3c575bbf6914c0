"""The continual-method interface: a strategy with hooks around each task (Avalanche-style).

The engine (:mod:`conceptstream.engine`) owns the model, the data and the training loop; a
method decides what is trainable, what the loss is, and what happens before and after a task,
and keeps its own state (Fisher, anchors, adapter pool, locked deltas) as named tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from conceptstream.adapters.registry import adapter_parameters
from conceptstream.methods.config import DEFAULT_STEPS, SettingSpec, TrainConfig, setting_specs
from conceptstream.models.conditioning import Cond, stack, unet_forward
from conceptstream.scoring.dc import DiffusionClassifier, candidate_subset


@dataclass
class ConceptInfo:
    """A concept of the stream as the methods see it."""

    token: str
    noun: str
    token_id: int
    task_index: int


@dataclass
class TaskContext:
    """Everything a method may use during one task. Latents live in memory only (replay-free)."""

    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    dc: DiffusionClassifier
    concepts: list[ConceptInfo]  # every seen concept, the current one last
    latent_mean: torch.Tensor  # [N, C, H, W] current task only
    latent_std: torch.Tensor
    generator: torch.Generator
    device: torch.device
    include_noun: bool = True
    progress: bool = False
    logs: list[dict] = field(default_factory=list)
    _cache: dict = field(default_factory=dict)
    # SDXL: the second tokenizer/text encoder (CLIP-G) and the micro-conditioning time ids; None for SD 1.x/2.x
    tokenizer_2: Any = None
    text_encoder_2: Any = None
    time_ids: tuple[int, ...] | None = None
    # Joint learning of several new concepts in one task (the bench's joint bound): the concept index
    # (into ``concepts``) of each latent row; None when the task learns one concept (``current``).
    latent_owner: torch.Tensor | None = None
    _owners: torch.Tensor | None = None  # the owners of the rows of the latest sample_latents draw

    @property
    def current(self) -> ConceptInfo:
        return self.concepts[-1]

    @property
    def n_seen(self) -> int:
        return len(self.concepts)

    def prompt(self, concept: ConceptInfo) -> str:
        return f"a photo of a {concept.token} {concept.noun}" if self.include_noun else f"a photo of a {concept.token}"

    @staticmethod
    def class_prompt(noun: str) -> str:
        return f"a photo of a {noun}"

    def encode(self, prompts: list[str]) -> Cond:
        """The prompts' UNet conditioning: hidden states ``[N, L, D]`` (SD 1.x/2.x), or an SDXL
        :class:`~conceptstream.models.conditioning.Conditioning` (hidden states, pooled embeds, time ids)."""
        from conceptstream.models.conditioning import encode_conditioning

        pairs = [(self.tokenizer, self.text_encoder)]
        if self.text_encoder_2 is not None:
            pairs.append((self.tokenizer_2, self.text_encoder_2))
        return encode_conditioning(pairs, prompts, self.time_ids, self.device)

    def fixed_embedding(self, prompt: str) -> Cond:
        """Embeddings of prompts that cannot change during the task (cached, no grad)."""
        if prompt not in self._cache:
            with torch.no_grad():
                self._cache[prompt] = self.encode([prompt])[0]
        return self._cache[prompt]

    def sample_latents(self, batch_size: int) -> torch.Tensor:
        """A minibatch of current-task latents (posterior samples, random horizontal flips)."""
        n = self.latent_mean.shape[0]
        idx = torch.randint(0, n, (batch_size,), generator=self.generator)
        eps = torch.randn(self.latent_mean[idx].shape, generator=self.generator)
        z = self.latent_mean[idx] + self.latent_std[idx] * eps
        flip = torch.rand(batch_size, generator=self.generator) < 0.5
        z = torch.where(flip[:, None, None, None], z.flip(-1), z)
        if self.latent_owner is not None:
            self._owners = self.latent_owner[idx]
        return z.to(self.device)

    def batch_prompts(self, batch_size: int) -> list[str]:
        """The caption of each row of the latest :meth:`sample_latents` draw: the current concept's prompt,
        or under joint learning each row's own concept's."""
        if self.latent_owner is None:
            return [self.prompt(self.current)] * batch_size
        if self._owners is None or len(self._owners) != batch_size:
            raise RuntimeError("batch_prompts must follow the sample_latents draw of the same batch")
        return [self.prompt(self.concepts[int(o)]) for o in self._owners]

    def dc_candidates(self, k: int, required: tuple[int, ...] = ()) -> tuple[Cond, list[int], int]:
        """Candidate embeddings [K, L, D]: c_0 (class prompt of the current noun) + k seen concepts.

        Returns the embeddings, the concept index of each candidate (-1 for c_0) and the position
        of the current concept. The current concept's embedding keeps its gradient path.
        """
        cur = self.n_seen - 1
        chosen = candidate_subset(self.n_seen, cur, k, self.generator, required)
        embeds = [self.fixed_embedding(self.class_prompt(self.current.noun))]
        for i in chosen:
            prompt = self.prompt(self.concepts[i])
            embeds.append(self.encode([prompt])[0] if i == cur else self.fixed_embedding(prompt))
        return stack(embeds), [-1, *chosen], 1 + chosen.index(cur)


class ContinualMethod:
    """Base strategy: sequential fine-tuning of the adapter and the new token (plain denoising loss)."""

    name: ClassVar[str] = "base"
    uses_adapter: ClassVar[bool] = True
    trains_token: ClassVar[bool] = True
    random_token_init: ClassVar[bool] = False
    include_noun: ClassVar[bool] = True
    # How the method's saved state grows with the number of tasks (documented in `info`).
    state_growth: ClassVar[str] = "none beyond one token row per concept"
    # The config dataclasses whose fields are the method's settings (methods/config.py), in manifest order.
    configs: ClassVar[tuple[type, ...]] = (TrainConfig,)
    # Overrides of the configs' defaults for one method (its tuning winner, docs/DEFAULTS.md).
    defaults: ClassVar[dict[str, Any]] = {}
    # A method whose best adapter step differs from the adapter kind's default, by adapter kind.
    adapter_lr: ClassVar[dict[str, float]] = {}
    # The adapter kinds the method is defined on (None: any registered kind).
    adapter_kinds: ClassVar[tuple[str, ...] | None] = None
    # Whether the method can learn several concepts in one task (engine.learn_joint): its loss is the
    # plain denoising loss on ``sample_latents`` draws and nothing in it refers to ``ctx.current`` alone.
    supports_joint: ClassVar[bool] = False
    # Training steps of one task when the caller gives none (learn, the bench): a method that needs
    # another budget to learn at all (docs/DEFAULTS.md) sets its own.
    default_steps: ClassVar[int] = DEFAULT_STEPS

    def __init__(self, **hparams: Any) -> None:
        """Settings are the configs' defaults updated by ``hparams``. Only the names are checked here:
        user values are checked by ``methods.registry.validate_settings``, and a saved state's are taken
        as they were saved."""
        defaults = self.all_defaults()
        unknown = set(hparams) - set(defaults)
        if unknown:
            from conceptstream.errors import UserInputError

            raise UserInputError(f"method {self.name!r} has no setting(s) {sorted(unknown)}; "
                                 f"it takes: {', '.join(sorted(defaults))}")
        self.hparams = {**defaults, **hparams}

    @classmethod
    def setting_specs(cls) -> dict[str, SettingSpec]:
        """Every setting of the method (the fields of its configs) with its type, range and help."""
        return setting_specs(cls.configs)

    @classmethod
    def all_defaults(cls) -> dict[str, Any]:
        """``{setting: default}``: the configs' field defaults, then the method's ``defaults`` overrides."""
        merged = {name: spec.default for name, spec in cls.setting_specs().items()}
        for klass in reversed(cls.__mro__):
            overrides = klass.__dict__.get("defaults") or {}
            unknown = set(overrides) - set(merged)
            if unknown:
                raise TypeError(f"{klass.__name__}.defaults overrides {sorted(unknown)}, which none of its "
                                "configs declares")
            merged.update(overrides)
        return merged

    # -- what is trained ---------------------------------------------------------------------
    def trainable_groups(self, ctx: TaskContext, token_rows: torch.nn.Parameter | None) -> list[dict]:
        """Optimizer parameter groups for this task."""
        groups = []
        if self.uses_adapter:
            groups.append({"params": list(adapter_parameters(ctx.unet).values()), "lr": self.hparams["lr"],
                           "name": "adapter"})
        if token_rows is not None:
            groups.append({"params": [token_rows], "lr": self.hparams["token_lr"], "name": "token"})
        return groups

    # -- hooks -------------------------------------------------------------------------------
    def setup(self, unet, n_tasks_done: int) -> None:
        """Called once after the model and the method state are loaded (training or inference)."""

    def before_task(self, ctx: TaskContext) -> None:
        """Called before the first step of a task."""

    def loss(self, ctx: TaskContext, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        z = ctx.sample_latents(self.hparams["batch_size"])
        loss = self.denoise_loss(ctx, z)
        return loss, {"denoise": loss.item()}

    def after_task(self, ctx: TaskContext) -> None:
        """Called after the last step (Fisher, consolidation, bookkeeping)."""

    def prepare_inference(self, unet) -> None:
        """Put the method's state into the UNet for sampling (e.g. C-LoRA's locked deltas)."""

    # -- state -------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise ValueError(f"method {self.name} keeps no state but got {len(tensors)} tensors")

    # -- shared pieces -----------------------------------------------------------------------
    @staticmethod
    def denoise_loss(ctx: TaskContext, z: torch.Tensor) -> torch.Tensor:
        b = z.shape[0]
        t = torch.randint(0, ctx.dc.num_train_timesteps, (b,), generator=ctx.generator).to(ctx.device)
        noise = torch.randn(z.shape, generator=ctx.generator).to(ctx.device)
        cond = ctx.encode(ctx.batch_prompts(b))
        pred = unet_forward(ctx.unet, ctx.dc.noisy(z, t, noise), t, cond)
        return F.mse_loss(pred.float(), ctx.dc.training_target(z, t, noise).float())
