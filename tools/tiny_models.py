"""Tiny random-weight models on disk, in the layouts the production loaders read.

Used by the tests and by `start.sh --demo` (python -m tools.tiny_models MODELS_DIR), which places
them where job_types.yaml expects the real checkpoints. Outputs are noise: the weights are random.


    tiny = build_tiny_sdxl(tmp_dir)
    tiny.folder        # diffusers folder (save_pretrained): also the `config=` folder for single-file loads
    tiny.single_file   # original LDM/SGM-layout .safetensors, detected by diffusers as SDXL base
    build_tiny_wan(folder, "t2v")   # tools/tiny_wan.py: Wan T2V, I2V ("i2v") or VACE ("vace") folders

Shapes follow diffusers' own SDXL tests (UNet blocks 32/64, CLIP hidden 32), with two changes the
single-file path needs: text_encoder_2 has its own hidden size (64), because diffusers tells the
two text encoders apart by the width of their position embeddings, and 10 layers, because SDXL
detection looks for `conditioner.embedders.1.model.transformer.resblocks.9.*`.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from tools.sdxl_to_ldm import pipeline_to_ldm

VOCAB_SIZE = 1000
TE1_HIDDEN = 32
TE2_HIDDEN = 64
TE2_PROJECTION = 32
TIME_EMBED_DIM = 8


@dataclass(frozen=True)
class TinySDXL:
    folder: Path        # diffusers-format pipeline folder
    single_file: Path   # original-layout single-file checkpoint with the same weights


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for the bytes 0..255."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tokenizer_files(directory: Path) -> tuple[Path, Path]:
    """A generated CLIP vocab: every byte alone and word-final, no merges.

    Any text tokenizes (one token per character), so real prompts work with random weights.
    The special tokens take the last ids, as in CLIP, so `argmax(input_ids)` finds the end token.
    """
    directory.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for char in _bytes_to_unicode():
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = VOCAB_SIZE - 2
    vocab["<|endoftext|>"] = VOCAB_SIZE - 1
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n", encoding="utf-8")
    return vocab_file, merges_file


def _text_config(hidden: int, layers: int, projection: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=37, num_hidden_layers=layers,
        num_attention_heads=4, projection_dim=projection, hidden_act="gelu", layer_norm_eps=1e-5,
        max_position_embeddings=77, bos_token_id=VOCAB_SIZE - 2, eos_token_id=VOCAB_SIZE - 1, pad_token_id=VOCAB_SIZE - 1,
    )


def tiny_sdxl_pipeline(tokenizer_dir: Path) -> StableDiffusionXLPipeline:
    """Random weights, seeded, so every build gives the same model."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TE2_PROJECTION,
        cross_attention_dim=TE1_HIDDEN + TE2_HIDDEN, norm_num_groups=1,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon",
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=128,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        scaling_factor=0.13025, force_upcast=True,
    )
    text_encoder = CLIPTextModel(_text_config(TE1_HIDDEN, 5, TE1_HIDDEN))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(TE2_HIDDEN, 10, TE2_PROJECTION))
    vocab_file, merges_file = write_tokenizer_files(tokenizer_dir)
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77, pad_token="<|endoftext|>")
    tokenizer_2 = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77, pad_token="<|endoftext|>")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
    )
    return pipe.to(torch.float32)


def build_tiny_sdxl(root: Path) -> TinySDXL:
    """Write the tiny pipeline under `root` as a diffusers folder and as one original-layout file."""
    root = Path(root)
    pipe = tiny_sdxl_pipeline(root / "vocab")
    folder = root / "tiny-sdxl"
    pipe.save_pretrained(folder, safe_serialization=True)
    single_file = root / "tiny-sdxl-single.safetensors"
    save_file(pipeline_to_ldm(pipe), str(single_file))
    return TinySDXL(folder=folder, single_file=single_file)


DEMO_JOB_TYPES = "demo_job_types.yaml"


def install_demo_models(models_dir: Path) -> None:
    """Put a tiny SDXL where job_types.yaml expects LUSTIFY (single file) and its config folder,
    and write demo_job_types.yaml: the catalog at 256x256, so a CPU finishes a job in seconds."""
    from tools.small_catalog import write_small_job_types
    from workers.config import load_catalog

    catalog = load_catalog()
    model = catalog.models["lustify_sdxl"]
    target = Path(models_dir) / model.path
    # Written at every start (derived from job_types.yaml, so new job types reach an old demo folder);
    # 17-frame clips: a CPU renders the tiny Wan's videos in seconds too.
    written = write_small_job_types(Path(models_dir) / ".catalog", width=256, height=256, steps=None, frames=17)
    written.rename(Path(models_dir) / DEMO_JOB_TYPES)
    written.parent.rmdir()
    _install_tiny_wan(Path(models_dir), catalog)
    _install_tiny_image_models(Path(models_dir), catalog)
    if target.exists():
        print(f"demo models already in {models_dir}")
        return
    tiny = build_tiny_sdxl(Path(models_dir) / ".build")
    target.parent.mkdir(parents=True, exist_ok=True)
    tiny.folder.rename(Path(models_dir) / model.config_path)
    tiny.single_file.rename(target)
    shutil.rmtree(Path(models_dir) / ".build")
    print(f"tiny random-weight SDXL written to {target} (outputs are noise)")


def _install_tiny_wan(models_dir: Path, catalog) -> None:
    """A tiny Wan folder wherever job_types.yaml expects a Wan checkpoint (T2V, I2V, VACE)."""
    from tools.tiny_wan import build_tiny_wan

    kinds = {"wan": "t2v", "wan_i2v": "i2v", "wan_vace": "vace"}
    for model in catalog.models.values():
        target = models_dir / model.path
        if model.family in kinds and not (target / "model_index.json").exists():
            build_tiny_wan(target, kinds[model.family])
            print(f"tiny random-weight Wan ({kinds[model.family]}) written to {target} (outputs are noise)")


def _install_tiny_image_models(models_dir: Path, catalog) -> None:
    """Tiny Qwen-Image, Qwen-Image-Edit and Z-Image folders where job_types.yaml expects them, and a
    random stand-in for each LoRA a job type names (the fast tier's Lightning LoRA) in models_dir/loras."""
    from tools.tiny_lora import build_tiny_lora
    from tools.tiny_qwen import build_tiny_qwen, tiny_qwen_pipeline
    from tools.tiny_zimage import build_tiny_zimage

    builders = {"qwen_image": lambda t: build_tiny_qwen(t, "t2i"), "qwen_image_edit": lambda t: build_tiny_qwen(t, "edit"),
                "z_image": build_tiny_zimage}
    for model in catalog.models.values():
        target = models_dir / model.path
        if model.family in builders and not (target / "model_index.json").exists():
            builders[model.family](target)
            print(f"tiny random-weight {model.family} written to {target} (outputs are noise)")
    for spec in catalog.job_types.values():
        for lora in spec.loras:
            path = models_dir / "loras" / f"{lora.name}.safetensors"
            if not path.exists():
                build_tiny_lora(tiny_qwen_pipeline("t2i", models_dir / ".scratch"), path)
                shutil.rmtree(models_dir / ".scratch", ignore_errors=True)
                print(f"tiny random stand-in for the LoRA {lora.name} written to {path}")


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m tools.tiny_models MODELS_DIR")
    install_demo_models(Path(sys.argv[1]))
