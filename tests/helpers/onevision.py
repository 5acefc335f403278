"""A tiny random LLaVA-OneVision saved as an HF directory, a small Qwen2-style tokenizer, and
transformers' own model and image processor on them (the numerical references).

The tower is SigLIP-shaped at a toy geometry: 30-pixel tiles of 7-pixel patches, so the 'valid'
convolution drops two pixel rows and columns and each tile gives 4×4 features, and the budget is
``anyres_max_2`` (32 grid features, ×1.21), so a 2×2 or 3×1 grid that is not cut much is
downscaled bilinearly, as a 7×7 grid of 27×27 would be under anyres_max_9.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TOL = 1e-4
TILE, PATCH, SIDE = 30, 7, 4  # SIDE = TILE // PATCH features per tile side
PINPOINTS = [[30, 30], [30, 60], [60, 30], [60, 60], [30, 90], [90, 30]]
ASPECT = "anyres_max_2"
VOCAB = 512
MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
# The tiny SigLIP tower's fields, shared by HF's config and ours (plus num_hidden_layers).
SIGLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "image_size": TILE,
    "patch_size": PATCH,
}

# Qwen2's special tokens (their spellings; the ids are this small vocabulary's).
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
# llava-hf/llava-onevision-qwen2-*-ov-hf's chat_template.json.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CORPUS = [
    "A dog runs along the beach. A red circle above a blue square. What is in the box?",
    "Summary above sentence in one word: Summary above image in one word:",
    "Represent the given image with the following question: Find a caption for the news in the photo.",
    "user assistant system The quick brown fox jumps over the lazy dog. Rain. 0123456789",
]


def qwen2_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """A byte-level BPE trained on a few sentences, with Qwen2's special tokens and no BOS, as
    Qwen2TokenizerFast (no Qwen2 vocabulary installs offline)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIALS,
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer)
    tokenizer = transformers.Qwen2TokenizerFast(
        tokenizer_object=bpe,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=SPECIALS[1:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


IMAGE_TOKEN = SPECIALS.index("<image>")  # trained vocabularies put the special tokens first


def image_processor() -> transformers.LlavaOnevisionImageProcessor:
    return transformers.LlavaOnevisionImageProcessor(
        size={"height": TILE, "width": TILE},
        image_grid_pinpoints=PINPOINTS,
        image_mean=MEAN,
        image_std=STD,
    )


def write_tiny_onevision(out: Path, seed: int = 0, *, text_hidden: int = 64) -> Path:
    """A random tiny LLaVA-OneVision (SigLIP + GQA Qwen2) saved with its tokenizer and image processor."""
    torch.manual_seed(seed)
    vision = transformers.SiglipVisionConfig(num_hidden_layers=2, vision_use_head=False, **SIGLIP)
    text = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=1e6,
    )
    cfg = transformers.LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        video_token_index=SPECIALS.index("<video>"),
        image_grid_pinpoints=PINPOINTS,
        vision_aspect_ratio=ASPECT,
    )
    model = transformers.LlavaOnevisionForConditionalGeneration(cfg).eval()
    model.save_pretrained(out, safe_serialization=True)
    qwen2_tokenizer().save_pretrained(out)
    image_processor().save_pretrained(out)
    return out


def random_image(size: tuple[int, int], seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


class Reference:
    """transformers' LlavaOnevisionForConditionalGeneration with its image processor and the tokenizer.

    ``LlavaOnevisionProcessor`` itself needs torchvision (for its video processor), which the main
    test env lacks, so ids are built as it builds them: the prompt tokenised, each ``<image>``
    widened to the image's packed feature count, which is read off the model itself here (and
    compared with the processor's count in the reference interpreter, tests/reference_llava_onevision.py).
    """

    def __init__(self, path: Path) -> None:
        self.model = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(
            path, attn_implementation="eager"
        ).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        self.image_processor = transformers.LlavaOnevisionImageProcessor.from_pretrained(path)

    def pixels(self, image: Image.Image) -> dict[str, torch.Tensor]:
        out = self.image_processor(image, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}

    def num_image_tokens(self, image: Image.Image) -> int:
        """The length of HF's packed feature sequence for the image."""
        with torch.no_grad():
            (features,) = self.model.model.get_image_features(**self.pixels(image))
        return features.shape[0]

    def ids(self, prompt: str, image: Image.Image | None = None) -> list[int]:
        ids = self.tokenizer(prompt)["input_ids"]
        if image is None:
            return ids
        at = ids.index(IMAGE_TOKEN)
        return [*ids[:at], *[IMAGE_TOKEN] * self.num_image_tokens(image), *ids[at + 1 :]]

    def hidden(self, prompt: str, image: Image.Image | None = None) -> np.ndarray:
        """Final-norm hidden states (T, D) of one unpadded row."""
        kwargs = {} if image is None else self.pixels(image)
        with torch.no_grad():
            out = self.model(
                input_ids=torch.tensor([self.ids(prompt, image)]), output_hidden_states=True, **kwargs
            )
        return out.hidden_states[-1][0].numpy()

    def embed(self, prompt: str, image: Image.Image | None = None) -> np.ndarray:
        """Final-norm hidden state of the last token, L2-normalised (UniME's embedding)."""
        last = torch.from_numpy(self.hidden(prompt, image)[-1])
        return torch.nn.functional.normalize(last, dim=-1).numpy()


def onevision_config():
    """The tiny architecture as our config, without an HF directory (for tests that init at random)."""
    from unime_jax.models.decoder import DecoderConfig
    from unime_jax.models.llava_onevision import LlavaOnevisionConfig
    from unime_jax.models.siglip import SiglipVisionConfig

    return LlavaOnevisionConfig(
        text=DecoderConfig("qwen2", VOCAB, 32, 64, 1, 4, 2, 8, qkv_bias=True),
        vision=SiglipVisionConfig(num_hidden_layers=1, **SIGLIP),
        image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=tuple(tuple(p) for p in PINPOINTS),
        vision_aspect_ratio=ASPECT,
    )
