"""The Qwen2-VL processor of Qwen-Image-Edit, for images and text only.

transformers 5 builds `Qwen2VLProcessor` with a video processor, whose class exists only when
torchvision is installed; the stack does not ship torchvision. The edit pipeline never passes
videos, so this subclass drops the video part and keeps everything else (the same image processor,
tokenizer and image-token expansion). It reads a checkpoint's own `processor/` folder.
"""
from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin


class QwenImageTextProcessor(Qwen2VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_folder(cls, folder: Path) -> "QwenImageTextProcessor":
        """`processor/` of a Qwen-Image-Edit checkpoint: preprocessor_config.json and the tokenizer files."""
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return cls(image_processor=image_processor, tokenizer=tokenizer)

    def save_standard(self, folder: Path) -> None:
        """Write the layout of a real checkpoint's `processor/` (image processor + tokenizer files)."""
        self.image_processor.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
