"""Tiny random-weight Wan pipelines saved as diffusers folders, the layout the production loader reads.

    folder = build_tiny_wan(tmp_dir / "t2v", "t2v")     # WanPipeline
    folder = build_tiny_wan(tmp_dir / "i2v", "i2v")     # WanImageToVideoPipeline (Wan 2.1 layout: CLIP image encoder)
    folder = build_tiny_wan(tmp_dir / "vace", "vace")   # WanVACEPipeline
    folder = build_tiny_wan(tmp_dir / "a14b", "a14b")   # Wan 2.2 A14B layout: two transformers, boundary_ratio
    folder = build_tiny_wan(tmp_dir / "ti2v", "ti2v")   # Wan 2.2 TI2V-5B layout: 48-channel VAE, expand_timesteps

Shapes follow diffusers' own Wan tests (2 layers, 2 heads of 12, VAE base_dim 3). The UMT5 text
encoder is built from a config, and its tokenizer from a generated unigram vocabulary (every
printable ASCII character, with and without the word-start marker), so any prompt tokenizes
offline. Everything is seeded: two builds give the same weights. Outputs are noise.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import (AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline,
                       WanTransformer3DModel, WanVACEPipeline, WanVACETransformer3DModel)
from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, T5TokenizerFast, UMT5Config,
                          UMT5EncoderModel)

from tools.small_catalog import TINY_WAN_TRANSFORMER   # the shape a test MagCache calibration names

TEXT_DIM = 32
HEADS, HEAD_DIM = TINY_WAN_TRANSFORMER["num_attention_heads"], 12
LAYERS = TINY_WAN_TRANSFORMER["num_layers"]
KINDS = ("t2v", "i2v", "vace", "a14b", "ti2v")


def tiny_umt5_tokenizer() -> T5TokenizerFast:
    """A sentencepiece-style unigram vocabulary: specials first (pad 0, eos 1, unk 2, as in T5)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for char in string.ascii_letters + string.digits + string.punctuation:
        pieces += [(f"\u2581{char}", -3.0), (char, -4.0)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def _text_encoder(vocab_size: int) -> UMT5EncoderModel:
    config = UMT5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                        decoder_start_token_id=0)
    return UMT5EncoderModel(config)


def _transformer(kind: str):
    common = dict(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, out_channels=16,
                  text_dim=TEXT_DIM, freq_dim=256, ffn_dim=32, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                  rope_max_seq_len=32)
    if kind == "vace":
        return WanVACETransformer3DModel(in_channels=16, num_layers=3, vace_layers=[0, 2], vace_in_channels=96, **common)
    if kind == "i2v":
        # 16 noise + 4 mask + 16 first-frame latent channels; CLIP image tokens through added K/V.
        return WanTransformer3DModel(in_channels=36, num_layers=LAYERS, image_dim=4, added_kv_proj_dim=HEADS * HEAD_DIM,
                                     **common)
    if kind == "ti2v":
        return WanTransformer3DModel(in_channels=48, num_layers=LAYERS, **{**common, "out_channels": 48})
    return WanTransformer3DModel(in_channels=16, num_layers=LAYERS, **common)


def _vae(kind: str) -> AutoencoderKLWan:
    if kind == "ti2v":   # Wan 2.2's VAE: 48 latent channels, 2×2 pixel patches, 16× spatial compression
        return AutoencoderKLWan(base_dim=3, z_dim=48, in_channels=12, out_channels=12, dim_mult=[1, 1, 1, 1],
                                num_res_blocks=1, temperal_downsample=[False, True, True], is_residual=True,
                                patch_size=2, scale_factor_spatial=16, latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def tiny_wan_pipeline(kind: str = "t2v"):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    tokenizer = tiny_umt5_tokenizer()
    # Same seed before the shared parts: every kind gets the same text encoder and VAE weights,
    # as the real Wan 2.1 checkpoints share UMT5-XXL and the Wan VAE.
    torch.manual_seed(0)
    text_encoder = _text_encoder(len(tokenizer))
    vae = _vae(kind)
    torch.manual_seed(1)
    transformer = _transformer(kind)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    parts = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer)
    if kind == "i2v":
        vision = CLIPVisionConfig(hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, intermediate_size=16, patch_size=1)
        pipe = WanImageToVideoPipeline(image_encoder=CLIPVisionModel(vision),
                                       image_processor=CLIPImageProcessor(crop_size=32, size=32), **parts)
    elif kind == "vace":
        pipe = WanVACEPipeline(**parts)
    elif kind == "a14b":   # high-noise expert first, the low-noise one below boundary_ratio × 1000
        pipe = WanPipeline(transformer_2=_transformer(kind), boundary_ratio=0.875, **parts)
    elif kind == "ti2v":
        pipe = WanPipeline(expand_timesteps=True, **parts)
    else:
        pipe = WanPipeline(**parts)
    return pipe   # float32, as built


def build_tiny_wan(folder: Path, kind: str = "t2v") -> Path:
    """Write the tiny pipeline of `kind` as a diffusers folder at `folder`; returns it."""
    folder = Path(folder)
    tiny_wan_pipeline(kind).save_pretrained(folder, safe_serialization=True)
    return folder
