"""Export a stream for stock diffusers: one LoRA file + one textual-inversion file per token.

    OUT/pytorch_lora_weights.safetensors   diffusers LoRA layout (``pipe.load_lora_weights(OUT)``);
                                           the peft scaling is folded into lora_B, so alpha = rank.
                                           C-LoRA's locked deltas are merged in (rank r*T, exact);
                                           Custom Diffusion's K/V deltas are an exact full-rank LoRA.
    OUT/unet_vera/                         VeRA streams: peft's own format
                                           (``PeftModel.from_pretrained(pipe.unet, OUT/unet_vera)``).
    OUT/tokens/<name>.safetensors          ``{"<token>": embedding}`` (``pipe.load_textual_inversion``)
    OUT/export.json, OUT/README.md         what was exported and how to load it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conceptstream.adapters.registry import adapter_parameters


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


def export_stream(stream, out: str | Path) -> list[Path]:
    """Write a loaded :class:`~conceptstream.engine.ConceptStream` into ``out``; returns the files written."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    lora = lora_layers_for_diffusers(stream)
    if lora:
        StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=lora, safe_serialization=True)
        written.append(out / "pytorch_lora_weights.safetensors")
    if stream.method.uses_adapter and stream.settings.adapter.kind == "vera":
        written += _export_vera(stream, out / "unet_vera")
    token_dir = out / "tokens"
    token_dir.mkdir(exist_ok=True)
    emb = stream.pipe.text_encoder.get_input_embeddings().weight
    tokens = []
    for t in stream.tokens:
        path = token_dir / f"{t.strip('<>')}.safetensors"
        save_file({t: emb[stream.pipe.tokenizer.convert_tokens_to_ids(t)].detach().clone().contiguous()}, str(path))
        written.append(path)
        tokens.append({"token": t, "file": str(path.relative_to(out))})
    meta = {"base_model": stream.manifest["base_model"], "method": stream.manifest["method"]["name"],
            "lora": "pytorch_lora_weights.safetensors" if lora else None, "tokens": tokens,
            "concepts": stream.manifest["concepts"]}
    (out / "export.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "README.md").write_text(_readme(meta))
    written += [out / "export.json", out / "README.md"]
    return written


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
    if meta["lora"]:
        loads.append('pipe.load_lora_weights("OUT")')
    for t in meta["tokens"]:
        loads.append(f'pipe.load_textual_inversion("OUT/{t["file"]}")')
    body = "\n".join(loads)
    return f"""# conceptstream export

Base model: `{meta['base_model']['reference']}` (fingerprint {meta['base_model']['fingerprint']}).
Method: `{meta['method']}`. Tokens: {', '.join(t['token'] for t in meta['tokens'])}.

```python
import torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("BASE_MODEL", safety_checker=None)
{body}
gens = [torch.Generator().manual_seed(0 + i) for i in range(4)]
images = pipe(["a photo of a {meta['tokens'][0]['token'] if meta['tokens'] else ''} ..."] * 4,
              num_inference_steps=30, guidance_scale=5.0, generator=gens).images
```
With the same seed, steps and guidance this reproduces `conceptstream generate` within
numerical noise. VeRA streams: `from peft import PeftModel; PeftModel.from_pretrained(pipe.unet, "OUT/unet_vera")`.
"""
