"""The Hub's cache as a download leaves it, filled with tiny models under the names the documentation uses, so that
the snippets of README.md and docs/ run as written, offline (`HF_HUB_OFFLINE=1`, `HF_HUB_CACHE` pointing here)."""

import functools
import json
from collections.abc import Callable
from pathlib import Path

import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

REVISION = "0" * 40


def cached_repository(cache: Path, repo_id: str, write: Callable[[Path], None]) -> None:
    """`refs/main` naming a snapshot that holds what `write(snapshot)` saves: how `huggingface_hub` finds a download
    again offline."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    write(snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)


def save_timm_for_hub(model, snapshot: Path, timm) -> None:
    """The files `timm.models.push_to_hf_hub` uploads: config.json with the architecture, model.safetensors."""
    timm.models.save_for_hf(model, snapshot)
    config = json.loads((snapshot / "config.json").read_text())
    del config["model_args"]  # what create_model was given here; the Hub's timm repositories carry none
    (snapshot / "config.json").write_text(json.dumps(config))


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    words = ["[PAD]", "[UNK]", "a", "photo", "of", "cat", "dog", "this", "is", "square", "circle", "triangle", "."]
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", model_max_length=16, do_lower_case=True
    )


def tiny_dinov2(snapshot: Path) -> None:
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=4, image_size=32
    )
    transformers.Dinov2Model(config).save_pretrained(snapshot)
    processor = transformers.BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(snapshot)


def tiny_siglip(snapshot: Path) -> None:
    tower = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    vision = dict(tower, image_size=32, patch_size=8)  # the text: 64 positions, as the pipeline pads prompts to 64
    text = dict(tower, vocab_size=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision, text_config=text)).save_pretrained(
        snapshot
    )
    image_processor = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    transformers.SiglipProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer()).save_pretrained(snapshot)


def fill(cache: Path, timm=None) -> None:
    """Every Hub name the documentation's snippets load (timm's only where `timm` is given)."""
    cached_repository(cache, "facebook/dinov2-small", tiny_dinov2)
    cached_repository(cache, "google/siglip-so400m-patch14-384", tiny_siglip)
    if timm is not None:
        model = timm.create_model("mvitv2_tiny", num_classes=1000)
        cached_repository(cache, "timm/mvitv2_tiny.fb_in1k", functools.partial(save_timm_for_hub, model, timm=timm))
