"""Export a stream for stock diffusers (``format="diffusers"``) or for A1111 / ComfyUI / kohya tools
(``format="kohya"``).

diffusers format (the default):

    OUT/pytorch_lora_weights.safetensors   diffusers LoRA layout (``pipe.load_lora_weights(OUT)``);
                                           the peft scaling is folded into lora_B, so alpha = rank.
                                           C-LoRA's locked deltas are merged in (rank r*T, exact);
                                           Custom Diffusion's K/V deltas are an exact full-rank LoRA.
    OUT/unet_vera/                         VeRA streams: peft's own format
                                           (``PeftModel.from_pretrained(pipe.unet, OUT/unet_vera)``).
    OUT/tokens/<name>.safetensors          ``{"<token>": embedding}`` (``pipe.load_textual_inversion``); SDXL:
                                           ``{"clip_l": [D1], "clip_g": [D2]}``, loaded into each encoder with
                                           ``pipe.load_textual_inversion(f["clip_l"], token=..., text_encoder=
                                           pipe.text_encoder, tokenizer=pipe.tokenizer)`` and the same with
                                           clip_g / text_encoder_2 / tokenizer_2.
    OUT/export.json, OUT/README.md         what was exported and how to load it.

kohya format (A1111, ComfyUI, kohya sd-scripts, and diffusers' ``load_lora_weights`` which converts it):

    OUT/<name>.safetensors                 the same LoRA with kohya key names
                                           (``lora_unet_<module path, '.' -> '_'>.lora_down.weight`` /
                                           ``.lora_up.weight`` / ``.alpha``). The peft scaling is folded into
                                           ``lora_up`` and ``alpha`` is written explicitly as the rank, so every
                                           reader's ``alpha / rank`` is 1 and strength 1 is the trained strength.
                                           Dense deltas (C-LoRA's merged past + live LoRAs are already a LoRA of
                                           rank r*T; Custom Diffusion's K/V deltas W) are written as the exact LoRA
                                           ``up = W, down = I`` (rank = in_features): ``up @ down`` is W bit for
                                           bit, which an SVD factorisation would only be up to rounding.
    OUT/embeddings/<word>.safetensors      one per token, A1111/ComfyUI form (SD 1.x: ``{"emb_params": [1, D]}``);
                                           the file name is the prompt word: ``<my-dog>`` -> ``my-dog``.
    OUT/export.json, OUT/README.md         what was exported and where each file goes.

What differs between base-model families lives in :data:`KOHYA_FAMILIES` (LoRA key prefix per
component, one embedding tensor per text encoder). SDXL UNet keys keep diffusers' module names too
(diffusers and ComfyUI read them as they are).
VeRA has no kohya equivalent and is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from conceptstream.adapters.registry import adapter_parameters
from conceptstream.errors import UserInputError

FORMATS = ("diffusers", "kohya")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class KohyaFamily:
    """How one base-model family is written in the kohya / A1111 / ComfyUI layout."""

    base_model_version: str | None  # kohya's ``ss_base_model_version`` metadata (A1111 filters LoRAs by it)
    lora_prefixes: dict[str, str]  # pipeline component -> kohya key prefix
    embeddings: tuple[tuple[str, str, str], ...]  # (key in the embedding file, text encoder, tokenizer) per encoder


KOHYA_FAMILIES: dict[str, KohyaFamily] = {
    # SD 1.x/2.x: one CLIP text encoder; kohya trains SD 1.x on the diffusers UNet, so UNet keys keep diffusers'
    # module names (A1111 and ComfyUI map them to the original checkpoint's names themselves).
    # No ss_base_model_version: the family also covers SD 2.x, and A1111 treats a LoRA without it as SD 1.x/2.x.
    "sd1": KohyaFamily(None, {"unet": "lora_unet_", "text_encoder": "lora_te_"},
                       (("emb_params", "text_encoder", "tokenizer"),)),
    # SDXL: two text encoders (CLIP-L, CLIP-G), each with its own LoRA prefix and embedding tensor.
    "sdxl": KohyaFamily("sdxl_base_v1-0", {"unet": "lora_unet_", "text_encoder": "lora_te1_",
                                           "text_encoder_2": "lora_te2_"},
                        (("clip_l", "text_encoder", "tokenizer"), ("clip_g", "text_encoder_2", "tokenizer_2"))),
}
# diffusers-format token files of SDXL streams: key -> (text encoder, tokenizer), as the kohya files hold them
SDXL_EMBEDDINGS = KOHYA_FAMILIES["sdxl"].embeddings


def lora_layers_for_diffusers(stream) -> dict[str, torch.Tensor] | None:
    """LoRA tensors in peft naming without the adapter name (``<module>.lora_A.weight``), scale folded."""
    method, unet = stream.method, stream.pipe.unet
    if hasattr(method, "export_lora"):
        return method.export_lora(unet)
    if not method.uses_adapter or stream.settings.adapter.kind != "lora":
        return None
    params = adapter_parameters(unet)
    out = {}
    for name, value in params.items():
        module = name.split(".lora_")[0]
        layer = unet.get_submodule(module)
        key = name.replace(".default.weight", ".weight")
        out[key] = value.detach().clone() * (layer.scaling["default"] if ".lora_B." in name else 1.0)
    return out


def export_stream(stream, out: str | Path, format: str = "diffusers", name: str | None = None) -> list[Path]:
    """Write a loaded :class:`~conceptstream.engine.ConceptStream` into ``out``; returns the files written.

    ``format``: ``"diffusers"`` (stock diffusers) or ``"kohya"`` (A1111 / ComfyUI / kohya); ``name``: the kohya
    LoRA's file name without ``.safetensors`` (default: the state folder's name)."""
    if format not in FORMATS:
        raise UserInputError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    if format == "kohya":
        return _export_kohya(stream, Path(out), name)
    if name is not None:
        raise UserInputError("--name names the kohya LoRA file; it only applies with --format kohya")
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    lora = lora_layers_for_diffusers(stream)
    sdxl = _is_sdxl(stream)
    if lora:
        pipeline_cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
        pipeline_cls.save_lora_weights(out, unet_lora_layers=lora, safe_serialization=True)
        written.append(out / "pytorch_lora_weights.safetensors")
    if stream.method.uses_adapter and stream.settings.adapter.kind == "vera":
        written += _export_vera(stream, out / "unet_vera")
    token_dir = out / "tokens"
    token_dir.mkdir(exist_ok=True)
    emb = stream.pipe.text_encoder.get_input_embeddings().weight
    tokens = []
    for t in stream.tokens:
        path = token_dir / f"{t.strip('<>')}.safetensors"
        if sdxl:
            save_file({key: _token_row(stream, t, encoder, tokenizer) for key, encoder, tokenizer in SDXL_EMBEDDINGS},
                      str(path))
        else:
            save_file({t: emb[stream.pipe.tokenizer.convert_tokens_to_ids(t)].detach().clone().contiguous()},
                      str(path))
        written.append(path)
        tokens.append({"token": t, "file": str(path.relative_to(out))})
    meta = {"base_model": stream.manifest["base_model"], "method": stream.manifest["method"]["name"],
            "pipeline": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
            "lora": "pytorch_lora_weights.safetensors" if lora else None, "tokens": tokens,
            "concepts": stream.manifest["concepts"]}
    (out / "export.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "README.md").write_text(_readme(meta))
    written += [out / "export.json", out / "README.md"]
    return written


def _is_sdxl(stream) -> bool:
    return getattr(stream.pipe, "text_encoder_2", None) is not None


def _token_row(stream, token: str, encoder: str, tokenizer: str) -> torch.Tensor:
    """A learned token's embedding row ``[D]`` in one text encoder of the stream's pipeline."""
    enc, tok = getattr(stream.pipe, encoder), getattr(stream.pipe, tokenizer)
    return enc.get_input_embeddings().weight[tok.convert_tokens_to_ids(token)].detach().clone().contiguous()


def _export_vera(stream, folder: Path) -> list[Path]:
    """VeRA through peft's format: a PeftModel over a freshly loaded base UNet with the same vectors."""
    from diffusers import UNet2DConditionModel
    from peft import get_peft_model

    from conceptstream.adapters.registry import ADAPTERS, adapter_state
    from conceptstream.models.loading import resolve_model

    base = UNet2DConditionModel.from_pretrained(resolve_model(stream.model_ref), subfolder="unet", use_safetensors=True)
    peft_model = get_peft_model(base, ADAPTERS["vera"].build_config(stream.settings.adapter))
    state = adapter_state(stream.pipe.unet)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            key = name.removeprefix("base_model.model.")
            if key in state:
                p.copy_(state[key])
        peft_model.base_model.vera_A["default"].copy_(state["vera_A"])
        peft_model.base_model.vera_B["default"].copy_(state["vera_B"])
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    return sorted(folder.iterdir())


def _readme(meta: dict) -> str:
    loads = []
    pipeline = meta.get("pipeline", "StableDiffusionPipeline")
    sdxl = pipeline == "StableDiffusionXLPipeline"
    if meta["lora"]:
        loads.append('pipe.load_lora_weights("OUT")')
    if sdxl and meta["tokens"]:
        loads.append("from safetensors.torch import load_file")
    for t in meta["tokens"]:
        if sdxl:
            loads.append(f'f = load_file("OUT/{t["file"]}")')
            loads += [f'pipe.load_textual_inversion(f["{key}"], token="{t["token"]}", text_encoder=pipe.{enc}, '
                      f'tokenizer=pipe.{tok})' for key, enc, tok in SDXL_EMBEDDINGS]
        else:
            loads.append(f'pipe.load_textual_inversion("OUT/{t["file"]}")')
    body = "\n".join(loads)
    load_base = ('pipe = StableDiffusionXLPipeline.from_pretrained("BASE_MODEL")' if sdxl
                 else 'pipe = StableDiffusionPipeline.from_pretrained("BASE_MODEL", safety_checker=None)')
    return f"""# conceptstream export

Base model: `{meta['base_model']['reference']}` (fingerprint {meta['base_model']['fingerprint']}).
Method: `{meta['method']}`. Tokens: {', '.join(t['token'] for t in meta['tokens'])}.

```python
import torch
from diffusers import {pipeline}
{load_base}
{body}
gens = [torch.Generator().manual_seed(0 + i) for i in range(4)]
images = pipe(["a photo of a {meta['tokens'][0]['token'] if meta['tokens'] else ''} ..."] * 4,
              num_inference_steps=30, guidance_scale=5.0, generator=gens).images
```
With the same seed, steps and guidance this reproduces `conceptstream generate` within
numerical noise. VeRA streams: `from peft import PeftModel; PeftModel.from_pretrained(pipe.unet, "OUT/unet_vera")`.
"""


# -- kohya / A1111 / ComfyUI ------------------------------------------------------------------------------------
def embedding_word(token: str) -> str:
    """The prompt word (and file name) of a token in A1111/ComfyUI: ``<my-dog>`` -> ``my-dog``.

    Both tools name an embedding after its file, and file names cannot hold ``<>`` on every system; tokens are
    ``<[A-Za-z0-9][A-Za-z0-9_.-]*>``, so dropping the brackets leaves a valid, distinct file name."""
    return token.strip("<>")


def kohya_family(pipe) -> KohyaFamily:
    """The :data:`KOHYA_FAMILIES` entry of a pipeline (SDXL: a second text encoder)."""
    key = "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd1"
    if key not in KOHYA_FAMILIES:
        raise UserInputError(f"--format kohya does not support {key.upper()} streams yet; use --format diffusers")
    return KOHYA_FAMILIES[key]


def kohya_lora_state(components: dict[str, dict[str, torch.Tensor]], family: KohyaFamily) -> dict[str, torch.Tensor]:
    """LoRA tensors in peft naming (``<module>.lora_A.weight`` / ``.lora_B.weight``, scaling already folded into
    lora_B, as :func:`lora_layers_for_diffusers` returns them), per pipeline component, in kohya naming:
    ``<prefix><module with '.' -> '_'>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``. ``alpha`` is
    written as the rank, so readers' ``alpha / rank`` is exactly 1 (the scale is already in lora_up)."""
    out: dict[str, torch.Tensor] = {}
    for component, layers in components.items():
        prefix = family.lora_prefixes[component]
        for key, down in layers.items():
            if ".lora_A." not in key:
                continue
            module = key.split(".lora_A.")[0]
            up = layers[f"{module}.lora_B.weight"]
            if up.shape[1] != down.shape[0]:
                raise ValueError(f"{module}: lora_B {tuple(up.shape)} does not fit lora_A {tuple(down.shape)}")
            base = prefix + module.replace(".", "_")
            out[f"{base}.lora_down.weight"] = down.detach().contiguous()
            out[f"{base}.lora_up.weight"] = up.detach().contiguous()
            out[f"{base}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


def kohya_embedding(stream, token: str, family: KohyaFamily) -> dict[str, torch.Tensor]:
    """One token's A1111/ComfyUI embedding file: one ``[1, D]`` tensor per text encoder (SD 1.x: ``emb_params``)."""
    out = {}
    for key, encoder, tokenizer in family.embeddings:
        enc, tok = getattr(stream.pipe, encoder), getattr(stream.pipe, tokenizer)
        row = enc.get_input_embeddings().weight[tok.convert_tokens_to_ids(token)]
        out[key] = row.detach().clone().unsqueeze(0).contiguous()
    return out


def _lora_name(stream, name: str | None) -> str:
    if name is None:
        folder = Path(stream.path).resolve().name if getattr(stream, "path", None) else ""
        return re.sub(r"[^A-Za-z0-9._-]", "-", folder).strip("-.") or "conceptstream"
    name = name.removesuffix(".safetensors")
    if not NAME_RE.match(name):
        raise UserInputError(f"invalid --name {name!r}: use letters, digits, '-', '_', '.' (it becomes the file "
                             "NAME.safetensors and the A1111 prompt tag <lora:NAME:1>)")
    return name


def _export_kohya(stream, out: Path, name: str | None) -> list[Path]:
    from safetensors.torch import save_file

    if stream.method.uses_adapter and stream.settings.adapter.kind == "vera":
        raise UserInputError("--format kohya cannot export a VeRA stream (A1111, ComfyUI and kohya have no VeRA "
                             "format); use --format diffusers, which writes it in peft's format")
    family = kohya_family(stream.pipe)
    name = _lora_name(stream, name)
    lora = lora_layers_for_diffusers(stream)
    state = kohya_lora_state({"unet": lora}, family) if lora else {}

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if state:
        metadata = {"ss_network_module": "networks.lora", "conceptstream_tokens": json.dumps(stream.tokens)}
        if family.base_model_version:
            metadata["ss_base_model_version"] = family.base_model_version
        save_file(state, str(out / f"{name}.safetensors"), metadata=metadata)
        written.append(out / f"{name}.safetensors")
    emb_dir = out / "embeddings"
    emb_dir.mkdir(exist_ok=True)
    nouns = {c["token"]: c["noun"] for c in stream.manifest["concepts"]}
    embeddings = []
    for t in stream.tokens:
        word = embedding_word(t)
        path = emb_dir / f"{word}.safetensors"
        save_file(kohya_embedding(stream, t, family), str(path))
        written.append(path)
        noun = f" {nouns[t]}" if stream.method.include_noun else ""
        embeddings.append({"token": t, "word": word, "file": str(path.relative_to(out)),
                           "prompt_a1111": f"a photo of a {word}{noun}",
                           "prompt_comfyui": f"a photo of a embedding:{word}{noun}",
                           "prompt_diffusers": f"a photo of a {t}{noun}"})
    meta = {"format": "kohya", "base_model": stream.manifest["base_model"],
            "pipeline": "StableDiffusionXLPipeline" if _is_sdxl(stream) else "StableDiffusionPipeline",
            "method": stream.manifest["method"]["name"],
            "lora": f"{name}.safetensors" if state else None, "lora_name": name if state else None,
            "embeddings": embeddings, "concepts": stream.manifest["concepts"]}
    (out / "export.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "README.md").write_text(_kohya_readme(meta))
    written += [out / "export.json", out / "README.md"]
    return written


def _kohya_readme(meta: dict) -> str:
    name, lora, embs = meta["lora_name"], meta["lora"], meta["embeddings"]
    tag = f" <lora:{name}:1>" if lora else ""
    ex = embs[0] if embs else {"prompt_a1111": "...", "prompt_comfyui": "...", "prompt_diffusers": "..."}
    rows = "\n".join(f"| `{e['token']}` | `{e['file']}` | `{e['word']}` | `{e['prompt_a1111']}{tag}` | "
                     f"`{e['prompt_comfyui']}` |" for e in embs)
    files = (f"`{lora}` (the LoRA, kohya key names; strength 1 = as trained)" if lora
             else "no LoRA (this method learns only embeddings)")
    a1111, comfy = [], []
    if lora:
        a1111.append(f"- `{lora}` -> `stable-diffusion-webui/models/Lora/`; `<lora:{name}:1>` in the prompt turns "
                     "it on at strength 1")
        comfy.append(f"- `{lora}` -> `ComfyUI/models/loras/`; add a **LoraLoader** node after the checkpoint loader, "
                     "pick the file, strength_model 1.0 (the LoRA has no text-encoder part: strength_clip does "
                     "not matter)")
    if embs:
        a1111.append("- `embeddings/*.safetensors` -> `stable-diffusion-webui/embeddings/`; write the prompt word")
        comfy.append("- `embeddings/*.safetensors` -> `ComfyUI/models/embeddings/`; write `embedding:WORD` in the "
                     "prompt")
    sdxl = meta.get("pipeline") == "StableDiffusionXLPipeline"
    loads = [f'pipe.load_lora_weights("OUT", weight_name="{lora}")'] if lora else []
    if sdxl:
        loads += ["from safetensors.torch import load_file"] if embs else []
        for e in embs:
            loads.append(f'f = load_file("OUT/{e["file"]}")')
            loads += [f'pipe.load_textual_inversion(f["{key}"], token="{e["token"]}", text_encoder=pipe.{enc}, '
                      f'tokenizer=pipe.{tok})' for key, enc, tok in SDXL_EMBEDDINGS]
    else:
        loads += [f'pipe.load_textual_inversion("OUT/{e["file"]}", token="{e["token"]}")' for e in embs]
    pipeline = meta.get("pipeline", "StableDiffusionPipeline")
    load_base = ('pipe = StableDiffusionXLPipeline.from_pretrained("BASE_MODEL")' if sdxl
                 else 'pipe = StableDiffusionPipeline.from_pretrained("BASE_MODEL", safety_checker=None)')
    nl = "\n"
    return f"""# conceptstream export (kohya / A1111 / ComfyUI format)

Base model: `{meta['base_model']['reference']}` (fingerprint {meta['base_model']['fingerprint']}); load these
files on top of that same base checkpoint. Method: `{meta['method']}`.

Files: {files} and one embedding per token in `embeddings/`. A1111 and ComfyUI call an embedding by
its **file name**, so the token `<my-dog>` becomes the file `embeddings/my-dog.safetensors` and the
prompt word `my-dog` (the angle brackets are dropped). A1111 swaps that word wherever it appears.

| token | file | prompt word | A1111 prompt | ComfyUI prompt |
|---|---|---|---|---|
{rows}

## AUTOMATIC1111 / Forge

{nl.join(a1111)}
- Prompt: `{ex['prompt_a1111']}{tag}`

## ComfyUI

{nl.join(comfy)}
- Prompt (CLIP Text Encode): `{ex['prompt_comfyui']}`

## diffusers

```python
from diffusers import {pipeline}
{load_base}
{nl.join(loads)}
image = pipe("{ex['prompt_diffusers']}").images[0]
```
With the same seed, steps and guidance this reproduces `conceptstream generate` within numerical noise.
"""
