"""A tiny random-weight Z-Image pipeline saved as a diffusers folder, the layout the production loader reads.

    folder = build_tiny_zimage(tmp_dir / "z-image")     # ZImagePipeline (Z-Image-Turbo layout)

Shapes follow diffusers' own Z-Image tests (transformer dim 32, 2 layers, 2 heads; Qwen3 text
encoder hidden 16), with a smaller VAE (block widths 8/16). The Qwen3 tokenizer is the generated
byte-level vocabulary of tools/tiny_qwen.py with a ChatML chat template, which the pipeline applies to
every prompt. Everything is seeded: two builds give the same weights. Outputs are noise.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from tools.tiny_qwen import tiny_qwen_tokenizer

# Qwen3's ChatML, reduced to what the pipeline uses (messages, generation prompt, enable_thinking).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT_HIDDEN = 16


def tiny_zimage_pipeline(scratch: Path) -> ZImagePipeline:
    tokenizer = tiny_qwen_tokenizer(scratch / "tokenizer")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=TEXT_HIDDEN, rope_theta=256.0,
        t_scale=1000.0, axes_dims=[8, 4, 4], axes_lens=[256, 128, 128])   # up to 512 px with this VAE (2x)
    with torch.no_grad():   # created with torch.empty: fixed values keep the outputs finite
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                        latent_channels=16, norm_num_groups=8, sample_size=32, scaling_factor=0.3611,
                        shift_factor=0.1159)
    torch.manual_seed(0)
    text_encoder = Qwen3Model(Qwen3Config(hidden_size=TEXT_HIDDEN, intermediate_size=16, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                          vocab_size=len(tokenizer), max_position_embeddings=1024,
                                          eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                          pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>")))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)


def build_tiny_zimage(folder: Path) -> Path:
    """Write the tiny pipeline as a diffusers folder at `folder`; returns it."""
    folder = Path(folder)
    scratch = folder.parent / f".{folder.name}-scratch"
    tiny_zimage_pipeline(scratch).save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return folder
