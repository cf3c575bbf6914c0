"""The bundled tiny Stable-Diffusion-format model: component configs and the real CLIP tokenizer.

The components are stock diffusers/transformers classes; only their sizes are small, so every
code path is the one a user runs with SD 1.x/2.x weights.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from importlib import resources
from pathlib import Path

IMAGE_SIZE = 64
LATENT_SIZE = 16  # VAE downsamples by 4 (three encoder blocks)
TEXT_DIM = 64

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=IMAGE_SIZE,
    mid_block_add_attention=False,
)

UNET_CONFIG = dict(
    sample_size=LATENT_SIZE,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(64, 96, 96),
    layers_per_block=1,
    cross_attention_dim=TEXT_DIM,
    attention_head_dim=8,
    norm_num_groups=32,
)

TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=TEXT_DIM,
    intermediate_size=4 * TEXT_DIM,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=TEXT_DIM,
    hidden_act="quick_gelu",
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_vocab(folder: Path) -> tuple[Path, Path]:
    """Write CLIP's ``vocab.json`` and ``merges.txt`` from the vendored BPE file."""
    raw = resources.files("conceptstream.assets").joinpath("clip_bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab_path, merges_path


def build_clip_tokenizer():
    """A stock ``transformers.CLIPTokenizer`` with the genuine CLIP vocabulary (49408 tokens)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = write_clip_vocab(Path(tmp))
        return CLIPTokenizer(
            vocab=str(vocab),
            merges=str(merges),
            model_max_length=77,
            bos_token="<|startoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
            pad_token="<|endoftext|>",
        )


VAE_DOWNSAMPLES = (2, 4)  # supported downsampling factors: 32x32 or 16x16 latents for 64x64 images


def vae_config(latent_channels: int = 4, downsample: int = 4) -> dict:
    """The AutoencoderKL config; ``downsample`` 4 is the bundled model's (three blocks, 16x16 latents),
    2 drops the last block (two blocks, 32x32 latents)."""
    if downsample not in VAE_DOWNSAMPLES:
        raise ValueError(f"VAE downsampling must be one of {VAE_DOWNSAMPLES}, got {downsample}")
    blocks = {4: (32, 64, 64), 2: (32, 64)}[downsample]
    return {**VAE_CONFIG, "latent_channels": latent_channels, "block_out_channels": blocks,
            "down_block_types": ("DownEncoderBlock2D",) * len(blocks), "up_block_types": ("UpDecoderBlock2D",) * len(blocks)}


def unet_config(latent_channels: int = 4, vae_downsample: int = 4, channels: tuple[int, ...] | None = None,
                layers_per_block: int = 1) -> dict:
    """The UNet2DConditionModel config for latents of ``latent_channels`` x (64 / ``vae_downsample``)^2.

    16x16 latents (downsample 4): the bundled model's three blocks (64, 96, 96), attention at 8x8 and
    4x4. 32x32 latents (downsample 2): a cheap convolution-only block of 32 channels in front, so the
    attention blocks run at the same 8x8 and 4x4 as before. Measured on one CPU thread (batch 16,
    forward + backward): 0.42 s at 16x16; 1.69 s for the same three blocks at 32x32 (attention at
    16x16); 0.59 s with the extra block (3.95M parameters against 4.03M).

    ``channels`` (one per block, default above) and ``layers_per_block`` (default 1) widen or deepen the
    UNet with the same block types, so a wider model is still a stock ``UNet2DConditionModel``."""
    if vae_downsample not in VAE_DOWNSAMPLES:
        raise ValueError(f"VAE downsampling must be one of {VAE_DOWNSAMPLES}, got {vae_downsample}")
    cfg = {**UNET_CONFIG, "in_channels": latent_channels, "out_channels": latent_channels,
           "sample_size": IMAGE_SIZE // vae_downsample}
    if vae_downsample == 2:
        cfg.update(block_out_channels=(32, *UNET_CONFIG["block_out_channels"]),
                   down_block_types=("DownBlock2D", *UNET_CONFIG["down_block_types"]),
                   up_block_types=(*UNET_CONFIG["up_block_types"], "UpBlock2D"))
    if channels is not None:
        check_unet_channels(channels, vae_downsample)
        cfg["block_out_channels"] = tuple(channels)
    if layers_per_block < 1:
        raise ValueError(f"the UNet needs >= 1 layer per block, got {layers_per_block}")
    cfg["layers_per_block"] = layers_per_block
    return cfg


def check_unet_channels(channels: tuple[int, ...], vae_downsample: int) -> None:
    """One width per UNet block (4 blocks at 32x32 latents, 3 at 16x16), each a positive multiple of
    the group norm's 32 groups."""
    n = 4 if vae_downsample == 2 else 3
    if len(channels) != n or any(c < 32 or c % 32 for c in channels):
        raise ValueError(f"the UNet at --vae-downsample {vae_downsample} takes {n} block widths, each a multiple "
                         f"of 32 (e.g. {','.join(str(c * 2) for c in unet_config(4, vae_downsample)['block_out_channels'])}), "
                         f"got {','.join(map(str, channels))}")


def build_vae(latent_channels: int = 4, downsample: int = 4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_config(latent_channels, downsample))


def build_components(seed: int = 0, latent_channels: int = 4, vae_downsample: int = 4,
                     unet_channels: tuple[int, ...] | None = None, unet_layers_per_block: int = 1) -> dict:
    """Freshly initialised components of the tiny pipeline (before base training).

    ``latent_channels`` (4 as in SD 1.x) sets the VAE's latent width and the UNet's input/output; more
    channels let the autoencoder keep finer patterns at the same 16x16 latent size. ``vae_downsample``
    (4, or 2 for 32x32 latents) sets the latent's spatial size, and with it the UNet's ``sample_size``;
    ``unet_channels`` and ``unet_layers_per_block`` its width and depth (see :func:`unet_config`)."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return dict(
        vae=build_vae(latent_channels, vae_downsample),
        unet=UNet2DConditionModel(**unet_config(latent_channels, vae_downsample, unet_channels, unet_layers_per_block)),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)),
        tokenizer=build_clip_tokenizer(),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
    )


def build_patch_discriminator(channels: tuple[int, ...] = (32, 64, 128)):
    """A small PatchGAN critic (one logit per ~16x16 patch) used only to sharpen the VAE decoder
    during base training; it is not part of the exported pipeline."""
    from torch import nn

    layers: list[nn.Module] = []
    in_ch = 3
    for i, ch in enumerate(channels):
        stride = 2 if i < len(channels) - 1 else 1
        layers.append(nn.Conv2d(in_ch, ch, 4, stride=stride, padding=1))
        if i > 0:
            layers.append(nn.GroupNorm(8, ch))
        layers.append(nn.LeakyReLU(0.2))
        in_ch = ch
    layers.append(nn.Conv2d(in_ch, 1, 4, stride=1, padding=1))
    return nn.Sequential(*layers)
