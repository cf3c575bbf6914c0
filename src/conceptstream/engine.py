"""The concept stream: one personalised model, learned one concept (task) at a time.

Data path: images -> VAE latents (memory only) -> method hooks (loss from scoring + adapters)
-> state directory (atomic commit) -> generate / export.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from conceptstream.adapters.fuse import fused_adapters
from conceptstream.adapters.registry import AdapterSpec, adapter_state, attach_adapter, load_adapter_state
from conceptstream.distributed import RANK_SEED_STRIDE, average_gradients, make_accelerator
from conceptstream.errors import ConceptstreamError, StateError, UserInputError
from conceptstream.methods.base import ConceptInfo, ContinualMethod, TaskContext
from conceptstream.methods.registry import get_method, method_defaults, validate_settings
from conceptstream.models.conditioning import sdxl_time_ids
from conceptstream.models.loading import check_same_kind, load_pipeline, model_fingerprint, pipeline_kind
from conceptstream.models.tokens import (
    ConceptEmbedding,
    add_tokens,
    check_new_token,
    encoder_pairs,
    init_token_rows,
    set_rows,
    token_key,
    unknown_tokens,
)
from conceptstream.scoring.dc import DCConfig, DiffusionClassifier
from conceptstream.system import library_versions, utc_now

DEFAULT_CHECKPOINT_EVERY = 50  # in-task checkpoint interval of `learn` (0 disables checkpoints)
CHECKPOINT_KIND = "conceptstream-learn-task"


class TrainingDiverged(ConceptstreamError):
    """The loss became NaN/inf; the task is dropped and the saved state is left as it was."""


def one_dc_temperature(method: str, hparams: dict[str, Any], dc: DCConfig) -> tuple[dict[str, Any], DCConfig]:
    """Method settings and DC config that agree on one DC temperature, the ``dc_temperature`` setting
    (``DCScoresConfig``) of a method that scores with DC: the value given in ``hparams`` (``--set``,
    ``--sweep``, a saved manifest's hyperparameters) wins, else the DC config's (``api.learn(dc=...)``,
    ``StreamSettings(dc=...)``). The classifier runs on the returned DC config and the manifest records both.
    Returns new objects; the inputs are left as they are."""
    if "dc_temperature" not in get_method(method).all_defaults():
        return dict(hparams), dc
    temperature = hparams.get("dc_temperature", dc.temperature)
    return {**hparams, "dc_temperature": temperature}, replace(dc, temperature=temperature)


@dataclass
class StreamSettings:
    """How a stream is built; fixed when the stream is created and recorded in its manifest."""

    method: str = "ewc-dc"
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    hparams: dict[str, Any] = field(default_factory=dict)
    dc: DCConfig = field(default_factory=DCConfig)


@dataclass
class TaskReport:
    token: str
    noun: str
    task_index: int
    steps: int
    seconds: float
    final_loss: float
    logs: list[dict]


def method_state_on(unet, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A method's saved tensors on the UNet's device, in float32 (what they were trained and saved in).

    Safetensors load on the CPU; every tensor a method keeps (EWC's Fisher and anchor, the DSC pool,
    C-LoRA's locked factors, Custom Diffusion's deltas) is combined with UNet tensors on the UNet's
    device. Each is kept in float32 like the trained values; where a method writes one into a base
    weight (C-LoRA, Custom Diffusion) it casts to that weight's dtype (a model loaded in fp16/bf16).
    """
    device = next(unet.parameters()).device
    return {k: v.to(device=device, dtype=torch.float32 if v.is_floating_point() else v.dtype)
            for k, v in tensors.items()}


class ConceptStream:
    """A loaded stream: base pipeline + learned tokens + adapter + method state."""

    def __init__(self, pipe, settings: StreamSettings, manifest: dict, path: Path | None = None,
                 device: str | torch.device = "cpu", model_ref: str | None = None) -> None:
        self.pipe = pipe
        self.settings = settings
        self.manifest = manifest
        self.path = path
        self.device = torch.device(device)
        self.model_ref = model_ref
        method_cls = get_method(settings.method)
        given, settings.dc = one_dc_temperature(settings.method, settings.hparams, settings.dc)
        self.method: ContinualMethod = method_cls(**{**method_defaults(settings.method, settings.adapter.kind),
                                                     **given})
        settings.hparams = dict(self.method.hparams)
        self._adapter_attached = False
        if self.method.uses_adapter:
            attach_adapter(self.pipe.unet, settings.adapter)
            self._adapter_attached = True
        if not self.method.uses_adapter:  # attach_adapter already froze the base for adapter methods
            self.pipe.unet.requires_grad_(False)
        for _, encoder in encoder_pairs(self.pipe):
            encoder.requires_grad_(False)
        self.pipe.vae.requires_grad_(False)
        self.dc = DiffusionClassifier(self.pipe.unet, self.pipe.scheduler, settings.dc)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def new(cls, model: str | None = "tiny", settings: StreamSettings | None = None, device: str = "cpu",
            dtype: torch.dtype = torch.float32, check_settings: bool = True) -> ConceptStream:
        """A stream with no concepts. ``settings.hparams`` are checked as user input (``validate_settings``)
        before the model loads; ``check_settings=False`` takes them as saved (an interrupted task's checkpoint)."""
        settings = settings or StreamSettings()
        settings.adapter.validate()
        method_defaults(settings.method, settings.adapter.kind)  # fail fast: unknown method, or not on this adapter
        if check_settings:
            settings = replace(settings, hparams=validate_settings(settings.method, settings.hparams,
                                                                   settings.adapter.kind))
        pipe = load_pipeline(model, dtype=dtype, device=device)
        ref = str(model or "tiny")
        manifest = {
            "format_version": 1,
            "base_model": {"reference": ref, "fingerprint": model_fingerprint(model), "kind": pipeline_kind(pipe)},
            "method": {},
            "concepts": [],
            "created_at": utc_now(),
            "updated_at": utc_now(),
            "versions": library_versions(extended=False),
        }
        stream = cls(pipe, settings, manifest, device=device, model_ref=ref)
        stream._sync_manifest()
        stream.method.setup(stream.pipe.unet, 0)
        return stream

    @classmethod
    def from_state(cls, manifest: dict, tensors: dict[str, dict[str, torch.Tensor]], model: str | None = None,
                   device: str = "cpu", dtype: torch.dtype = torch.float32, path: Path | None = None) -> ConceptStream:
        """Rebuild a stream from a manifest and its tensor files (see :mod:`conceptstream.api`)."""
        ref = model or manifest["base_model"]["reference"]
        check_same_kind(manifest["base_model"].get("kind"), ref)  # before the fingerprint: name both kinds
        fingerprint = model_fingerprint(ref)
        if fingerprint != manifest["base_model"]["fingerprint"]:
            raise StateError(f"this state was built on base model {manifest['base_model']['reference']!r} "
                             f"(fingerprint {manifest['base_model']['fingerprint']}), but {ref!r} has fingerprint "
                             f"{fingerprint}; pass --model with the original base model")
        m = manifest["method"]
        settings = StreamSettings(method=m["name"], adapter=AdapterSpec.from_dict(m["adapter"]) if m.get("adapter")
                                  else AdapterSpec(), hparams=dict(m.get("hyperparameters", {})),
                                  dc=DCConfig(**m.get("dc", {})))
        pipe = load_pipeline(ref, dtype=dtype, device=device)
        stream = cls(pipe, settings, manifest, path=path, device=device, model_ref=ref)
        tokens = [c["token"] for c in manifest["concepts"]]
        if tokens:
            rows = tensors.get("tokens", {})
            for n, (tokenizer, encoder) in enumerate(encoder_pairs(pipe)):
                keys = [token_key(t, n) for t in tokens]
                ids = add_tokens(tokenizer, encoder, tokens)
                missing = [t for t, key in zip(tokens, keys) if key not in rows]
                if missing:
                    which = "" if n == 0 else " in the second text encoder"
                    raise StateError(f"state is missing the embedding of {missing[0]}{which}; it is damaged")
                set_rows(encoder, {i: rows[key] for i, key in zip(ids, keys)})
        if stream.method.uses_adapter and "adapter" in tensors:
            load_adapter_state(pipe.unet, tensors["adapter"])
        stream.method.load_state_tensors(method_state_on(pipe.unet, tensors.get("method", {})))
        stream.method.setup(pipe.unet, len(tokens))
        return stream

    def _sync_manifest(self) -> None:
        s = self.settings
        self.manifest["method"] = {
            "name": s.method,
            "adapter": s.adapter.to_dict() if self.method.uses_adapter else None,
            "hyperparameters": dict(self.method.hparams),
            "dc": asdict(s.dc),
            "state_growth": self.method.state_growth,
        }
        self.manifest["updated_at"] = utc_now()
        self.manifest["versions"] = library_versions(extended=False)

    # -- views ---------------------------------------------------------------------------------
    @property
    def tokens(self) -> list[str]:
        return [c["token"] for c in self.manifest["concepts"]]

    @property
    def resolution(self) -> int:
        return int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)

    def concept_infos(self) -> list[ConceptInfo]:
        tok = self.pipe.tokenizer
        return [ConceptInfo(c["token"], c["noun"], tok.convert_tokens_to_ids(c["token"]), c["task_index"])
                for c in self.manifest["concepts"]]

    @property
    def kind(self) -> str:
        """The base model's kind: ``"sd1"`` (SD 1.x/2.x) or ``"sdxl"``."""
        return pipeline_kind(self.pipe)

    @property
    def time_ids(self) -> tuple[int, ...] | None:
        """SDXL's micro-conditioning time ids at the model's resolution; None for SD 1.x/2.x."""
        return sdxl_time_ids(self.resolution) if self.kind == "sdxl" else None

    def encode_prompts(self, prompts: list[str]):
        """The UNet conditioning of prompts (see :meth:`TaskContext.encode`): a tensor for SD 1.x/2.x, a
        :class:`~conceptstream.models.conditioning.Conditioning` for SDXL."""
        from conceptstream.models.conditioning import encode_conditioning

        return encode_conditioning(encoder_pairs(self.pipe), prompts, self.time_ids, self.device)

    def _context_parts(self) -> dict[str, Any]:
        """The model parts of a :class:`TaskContext` (SDXL: the second encoder and the time ids as well)."""
        pipe = self.pipe
        parts: dict[str, Any] = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer,
                                 "scheduler": pipe.scheduler}
        if self.kind == "sdxl":
            parts.update(text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2, time_ids=self.time_ids)
        return parts

    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        rows: dict[str, torch.Tensor] = {}
        for n, (tok, encoder) in enumerate(encoder_pairs(self.pipe)):
            emb = encoder.get_input_embeddings().weight
            rows.update({token_key(t, n): emb[tok.convert_tokens_to_ids(t)].detach().clone() for t in self.tokens})
        files = {"tokens": rows}
        if self.method.uses_adapter:
            files["adapter"] = adapter_state(self.pipe.unet)
        files["method"] = self.method.state_tensors()
        return files

    # -- learning ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior mean/std of the task's images, scaled; held in memory only."""
        import numpy as np

        vae = self.pipe.vae
        x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize((self.resolution,) * 2),
                                                     dtype=np.float32)) for im in images])
        x = (x.permute(0, 3, 1, 2) / 127.5 - 1).to(self.device, vae.dtype)
        means, stds = [], []
        for i in range(0, len(x), 8):
            post = vae.encode(x[i : i + 8]).latent_dist
            means.append(post.mean)
            stds.append(post.std)
        sf = vae.config.scaling_factor
        return torch.cat(means).float().cpu() * sf, torch.cat(stds).float().cpu() * sf

    def learn(self, images: list[Image.Image], token: str, noun: str, steps: int | None = None, seed: int = 0,
              progress: bool = True, on_step=None, checkpoint_every: int = 0, on_checkpoint=None,
              resume: tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]] | None = None,
              mixed_precision: str = "no", gradient_checkpointing: bool = False) -> TaskReport:
        """Learn one concept in memory (the caller commits). Raises before touching the model on bad input.

        Every ``checkpoint_every`` steps ``on_checkpoint(tensors, info)`` receives an in-task checkpoint
        (:meth:`_task_checkpoint`): the trained values, the optimizer state, the RNG states and the task's
        token/noun/seed/steps, never an image, a latent or an image feature (resuming re-reads the images).
        ``resume=(tensors, info)`` continues from such a checkpoint; the result equals an uninterrupted run.
        Training steps run through an ``accelerate.Accelerator``: ``mixed_precision`` ("no", "bf16", "fp16")
        autocasts the training-step forward passes (trained values stay fp32; fp16 uses accelerate's gradient
        scaler and needs a GPU); ``gradient_checkpointing`` trades UNet activation memory for recomputation.
        Under ``accelerate launch`` each process draws its own batches and gradients are averaged across
        processes every step (data parallelism); the Fisher and DSC consolidation run per process and the
        caller commits the main process's result. Fisher estimation and consolidation run in full precision.
        ``steps`` None: the method's ``default_steps``.
        """
        steps = self.method.default_steps if steps is None else steps
        return self._learn([(images, token, noun)], steps, seed, progress, on_step, checkpoint_every, on_checkpoint,
                           resume, mixed_precision, gradient_checkpointing)

    def learn_joint(self, concepts: list[tuple[list[Image.Image], str, str]], steps: int | None = None,
                    seed: int = 0, progress: bool = True, mixed_precision: str = "no",
                    gradient_checkpointing: bool = False) -> TaskReport:
        """Learn several concepts at once, ``(images, token, noun)`` each, in one task of ``steps`` steps: every
        minibatch draws from all their images, each image captioned with its own token (the *joint* reference
        bound of the bench, not continual learning). Only methods with ``supports_joint`` (``lora``), and SD
        1.x/2.x pipelines; no in-task checkpoints. The report's ``token`` lists the tokens. ``steps`` None: the
        method's ``default_steps`` per concept."""
        if not self.method.supports_joint:
            raise UserInputError(f"method {self.settings.method!r} learns one concept per task; joint learning of "
                                 "several concepts at once takes --method lora")
        if len(encoder_pairs(self.pipe)) != 1:
            raise UserInputError("joint learning of several concepts at once supports SD 1.x/2.x pipelines (one "
                                 "text encoder); learn SDXL concepts one at a time")
        if not concepts:
            raise UserInputError("no concepts given to learn jointly")
        tokens = [t for _, t, _ in concepts]
        steps = self.method.default_steps * len(concepts) if steps is None else steps
        if len(set(tokens)) != len(tokens):
            raise UserInputError(f"joint learning got a token twice ({', '.join(tokens)}); each concept needs its own")
        return self._learn(concepts, steps, seed, progress, None, 0, None, None, mixed_precision,
                           gradient_checkpointing)

    def _learn(self, items: list[tuple[list[Image.Image], str, str]], steps: int, seed: int, progress: bool,
               on_step, checkpoint_every: int, on_checkpoint, resume, mixed_precision: str,
               gradient_checkpointing: bool) -> TaskReport:
        """One task over ``items`` (one concept for ``learn``, several for ``learn_joint``)."""
        import time

        from tqdm.auto import tqdm

        cleaned = []
        for images, token, noun in items:
            if not images:
                raise UserInputError("no training images given")
            if token in self.tokens:
                raise UserInputError(f"token {token!r} is already in this stream; pick a new token for a new concept")
            for tokenizer, _ in encoder_pairs(self.pipe):
                check_new_token(tokenizer, token)
            noun = noun.strip()
            if not noun:
                raise UserInputError("the class noun is empty; give one, e.g. --noun 'teddy bear'")
            cleaned.append((images, token, noun))
        (images, token, noun), joint = cleaned[0], len(cleaned) > 1
        if steps < 1:
            raise UserInputError(f"--steps must be >= 1, got {steps}")
        accelerator = make_accelerator(mixed_precision, self.device)
        if checkpoint_every < 0:
            raise UserInputError(f"--checkpoint-every must be >= 0 (0 = no checkpoints), got {checkpoint_every}")
        if resume is not None:
            self._check_resume_info(resume[1], token, noun, steps, seed, len(images))
        t0 = time.time()
        process_seed = seed + RANK_SEED_STRIDE * accelerator.process_index  # each process draws its own batches
        progress = progress and accelerator.is_main_process
        torch.manual_seed(process_seed)
        encoded = [self.encode_images(imgs) for imgs, _, _ in cleaned]
        mean, std = torch.cat([m for m, _ in encoded]), torch.cat([s for _, s in encoded])
        pipe, method = self.pipe, self.method
        pairs = encoder_pairs(pipe)
        token_ids = []  # per encoder: one id per new token (SD 1.x/2.x: one encoder; SDXL: two, one token)
        for tokenizer, encoder in pairs:
            ids = add_tokens(tokenizer, encoder, [t for _, t, _ in cleaned])
            for tid, (_, _, n) in zip(ids, cleaned):
                init_token_rows(tokenizer, encoder, [tid], None if method.random_token_init else n, seed=seed)
            token_ids.append(ids)
        seen = self.concept_infos()
        new = [ConceptInfo(t, n, tid, len(seen) + k) for k, ((_, t, n), tid) in enumerate(zip(cleaned, token_ids[0]))]
        owner = torch.cat([torch.full((len(m),), len(seen) + k) for k, (m, _) in enumerate(encoded)]) if joint else None
        ctx = TaskContext(**self._context_parts(), dc=self.dc, concepts=[*seen, *new], latent_mean=mean,
                          latent_std=std, generator=torch.Generator().manual_seed(process_seed), device=self.device,
                          include_noun=method.include_noun, progress=progress, latent_owner=owner)
        wrappers = self._token_wrappers(token_ids[0] if joint else [ids[0] for ids in token_ids]) \
            if method.trains_token else []
        wrapper = wrappers[0] if wrappers else None
        for (_, encoder), w in zip(pairs, wrappers):
            encoder.set_input_embeddings(w)
        task = {"token": token, "noun": noun, "seed": seed, "steps": steps, "images": len(images)}
        token = " ".join(t for _, t, _ in cleaned)  # the report's name of the task
        try:
            method.before_task(ctx)
            groups = method.trainable_groups(ctx, wrapper.rows if wrapper is not None else None)
            opt = torch.optim.AdamW(groups, weight_decay=0.0)
            params = self._trained_parameters(opt, wrapper)
            opt = accelerator.prepare_optimizer(opt, device_placement=False)
            start, loss_value = 0, math.nan
            if resume is not None:
                start = self._restore_checkpoint(resume, params, opt, ctx.generator)
                loss_value = float(resume[1].get("loss", math.nan))
            pipe.unet.train()
            if gradient_checkpointing:
                pipe.unet.enable_gradient_checkpointing()
            logs: list[dict] = []
            bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"learn {token}", disable=not progress)
            for step in bar:
                with accelerator.autocast():
                    loss, info = method.loss(ctx, step)
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise self._diverged(f"the loss became {loss_value} at step {step} of {token}")
                opt.zero_grad(set_to_none=True)
                accelerator.backward(loss)  # fp16: scaled; steps with inf gradients are skipped at opt.step()
                average_gradients(accelerator, params.values())
                opt.step()
                info = {"step": step, "loss": loss_value, **info}
                logs.append(info)
                bar.set_postfix(loss=f"{loss_value:.4f}")
                if on_step is not None:
                    on_step(step, info)
                done = step + 1
                if on_checkpoint is not None and checkpoint_every and done % checkpoint_every == 0 and done < steps:
                    on_checkpoint(*self._task_checkpoint(params, opt, ctx.generator,
                                                         {**task, "step": done, "loss": loss_value}))
            bar.close()
            pipe.unet.eval()
            method.after_task(ctx)
            bad = self._first_non_finite(params, method.state_tensors())
            if bad:
                raise self._diverged(f"{bad} of {token} became NaN/inf during training")
        finally:
            for (_, encoder), w in zip(pairs, wrappers):
                encoder.set_input_embeddings(w.write_back())
            if gradient_checkpointing:
                pipe.unet.disable_gradient_checkpointing()
            pipe.unet.eval()
        logs.extend(ctx.logs)
        for info, (imgs, _, _) in zip(new, cleaned):
            self.manifest["concepts"].append({"token": info.token, "noun": info.noun, "task_index": len(self.tokens),
                                              "created_at": utc_now(), "steps": steps, "seed": seed,
                                              "images": len(imgs), "mixed_precision": mixed_precision,
                                              **({"learned_jointly_with": len(cleaned)} if joint else {})})
        self._sync_manifest()
        return TaskReport(token, " ".join(n for _, _, n in cleaned) if joint else noun, len(self.tokens) - 1, steps,
                          time.time() - t0, loss_value, logs)

    def _token_wrappers(self, token_ids: list[int]) -> list[ConceptEmbedding]:
        """One :class:`ConceptEmbedding` per text encoder for the new token. SD 1.x/2.x: one wrapper owning its
        row. SDXL: both wrappers read column slices of one parameter ``[1, D1 + D2]`` holding the CLIP-L and
        CLIP-G rows, so a method trains "the token" as one parameter on either kind."""
        pairs = encoder_pairs(self.pipe)
        bases = [encoder.get_input_embeddings() for _, encoder in pairs]
        if len(pairs) == 1:
            return [ConceptEmbedding(bases[0], token_ids)]
        rows = torch.nn.Parameter(torch.cat([b.weight.detach()[[i]] for b, i in zip(bases, token_ids)], dim=-1))
        wrappers, start = [], 0
        for base, tid in zip(bases, token_ids):
            width = base.weight.shape[1]
            wrappers.append(ConceptEmbedding(base, [tid], rows, slice(start, start + width)))
            start += width
        return wrappers

    # -- in-task checkpoints -------------------------------------------------------------------
    @staticmethod
    def _diverged(what: str) -> TrainingDiverged:
        return TrainingDiverged(f"{what}; the method's learning rates (--set lr=..., --set token_lr=...) or "
                                "regulariser weights are too high for these images; the saved state is unchanged")

    @staticmethod
    def _first_non_finite(params: dict[str, torch.Tensor], method_state: dict[str, torch.Tensor]) -> str | None:
        for kind, tensors in (("parameter", params), ("method state", method_state)):
            for name, value in tensors.items():
                if value.is_floating_point() and not bool(torch.isfinite(value.detach()).all()):
                    return f"{kind} {name}"
        return None

    def _trained_parameters(self, opt: torch.optim.Optimizer, wrapper: ConceptEmbedding | None) -> dict:
        """Every parameter the optimizer updates, by a stable name (``token``, ``unet.<name>``, ...)."""
        names = {id(p): f"unet.{n}" for n, p in self.pipe.unet.named_parameters()}
        for c, (_, encoder) in enumerate(encoder_pairs(self.pipe)):
            prefix = "text_encoder" if c == 0 else f"text_encoder_{c + 1}"
            names.update({id(p): f"{prefix}.{n}" for n, p in encoder.named_parameters()})
        if wrapper is not None:
            names[id(wrapper.rows)] = "token"
        out: dict[str, torch.nn.Parameter] = {}
        for gi, group in enumerate(opt.param_groups):
            for pi, p in enumerate(group["params"]):
                out[names.get(id(p), f"group{gi}.param{pi}")] = p
        return out

    def _task_checkpoint(self, params: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
                         generator: torch.Generator, task: dict[str, Any]):
        """``(tensors, info)`` of an in-task checkpoint. Tensor files and names (documented, checked by tests):

        - ``trainable``: the values being trained, ``token`` (the new token's row) and ``unet.<param>``;
        - ``optimizer``: AdamW state as ``<param index>.<exp_avg|exp_avg_sq|step>``;
        - ``rng``: ``torch`` (global CPU RNG), ``generator`` (the task's sampling RNG), ``cuda``.
        The task's latents are not saved: they are recomputed from the images on resume.
        """
        from conceptstream.safeio import optimizer_to_tensors

        opt_tensors, opt_meta = optimizer_to_tensors(opt)
        rng = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        tensors = {"trainable": {n: p.detach().cpu().clone() for n, p in params.items()},
                   "optimizer": {k: v.detach().cpu().clone() for k, v in opt_tensors.items()}, "rng": rng}
        info = {"kind": CHECKPOINT_KIND, **task, "method": self.settings.method,
                "stream": {"base_model": dict(self.manifest["base_model"]), "method": dict(self.manifest["method"])},
                "optimizer": opt_meta}
        return tensors, info

    def _check_resume_info(self, info: dict[str, Any], token: str, noun: str, steps: int, seed: int,
                           n_images: int) -> None:
        if info.get("kind") != CHECKPOINT_KIND:
            raise StateError("the checkpoint is not an in-task checkpoint of `learn`; discard it "
                             "(--discard-checkpoint)")
        expected = {"token": token, "noun": noun, "steps": steps, "seed": seed, "images": n_images,
                    "method": self.settings.method}
        for key, value in expected.items():
            if info.get(key) != value:
                raise StateError(f"the checkpoint does not fit this task: it has {key} {info.get(key)!r}, this task "
                                 f"{value!r}; resume with the interrupted task's settings or --discard-checkpoint")
        step = info.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or not 0 < step < steps:
            raise StateError(f"the checkpoint's step {step!r} is not within 1..{steps - 1}; it is damaged "
                             "(--discard-checkpoint)")

    def _restore_checkpoint(self, resume, params: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
                            generator: torch.Generator) -> int:
        """Load a checkpoint into the live task (values, optimizer, RNGs); returns the next step."""
        from conceptstream.safeio import optimizer_from_tensors

        tensors, info = resume
        damaged = "the checkpoint does not fit this stream ({}); discard it with --discard-checkpoint"
        trained = tensors.get("trainable", {})
        if set(trained) != set(params):
            extra, missing = sorted(set(trained) - set(params)), sorted(set(params) - set(trained))
            raise StateError(damaged.format(f"unexpected {extra[:1]}, missing {missing[:1]}"))
        try:
            with torch.no_grad():
                for name, p in params.items():
                    if trained[name].shape != p.shape:
                        raise ValueError(f"{name} has shape {tuple(trained[name].shape)}, expected {tuple(p.shape)}")
                    p.copy_(trained[name].to(p.device, p.dtype))
            optimizer_from_tensors(opt, tensors.get("optimizer", {}), info.get("optimizer", {}))
            rng = tensors.get("rng", {})
            torch.set_rng_state(rng["torch"])
            generator.set_state(rng["generator"])
            if self.device.type == "cuda" and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise StateError(damaged.format(f"{type(exc).__name__}: {exc}")) from None
        return int(info["step"])

    # -- sampling ------------------------------------------------------------------------------
    def check_prompt(self, prompt: str) -> None:
        unknown = unknown_tokens(prompt, self.pipe.tokenizer, self.tokens)
        if unknown:
            known = ", ".join(self.tokens) or "none yet"
            raise UserInputError(f"prompt uses {unknown[0]}, which this stream has not learned (learned: {known})")

    @torch.no_grad()
    def generate(self, prompt: str | list[str], n: int = 4, seed: int = 0, steps: int = 30,
                 guidance: float = 5.0, progress: bool = True, fuse: bool = True) -> list[Image.Image]:
        """Sample ``n`` images per prompt; image i uses ``torch.Generator().manual_seed(seed + i)``.

        With ``fuse`` (default) the adapter is merged into the base weights while sampling, so a
        step costs what a step of the bare base model costs; the original base weights are put back
        unchanged afterwards (see :func:`fused_adapters`). ``fuse=False`` runs the adapter branch
        as in training; the images differ only by float rounding.
        """
        import contextlib

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        for p in prompts:
            self.check_prompt(p)
        self.pipe.set_progress_bar_config(disable=not progress)
        images = []
        with fused_adapters(self.pipe.unet) if fuse else contextlib.nullcontext():
            for p in prompts:
                gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
                images += self.pipe([p] * n, num_inference_steps=steps, guidance_scale=guidance,
                                    generator=gens).images
        return images


