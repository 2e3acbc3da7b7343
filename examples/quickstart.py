"""Build a nano Castling-ViT, write its inference checkpoint, and classify a real photo with the pipeline.

The model is untrained, so its labels are arbitrary: this shows the path a checkpoint takes (castling form →
inference form on disk → Auto class → pipeline), not accuracy.

    python examples/quickstart.py [--output_dir outputs/quickstart]
"""

import argparse

import skimage.data
from PIL import Image
from transformers import AutoModelForImageClassification, pipeline

from castling_hf import CastlingViTConfig, CastlingViTForImageClassification, image_processor_for

LABELS = ["cat", "coffee", "astronaut", "camera"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/quickstart")
    args = parser.parse_args()

    config = CastlingViTConfig.from_size(
        "nano", id2label=dict(enumerate(LABELS)), label2id={label: i for i, label in enumerate(LABELS)}
    )
    model = CastlingViTForImageClassification(config)
    print(f"Built a nano Castling-ViT ({model.num_parameters():,} parameters), attention_mode={config.attention_mode!r}")

    # Training would decay α from 1 to 0 (CastlingMaskDecayCallback); here we set the end state directly.
    model.set_softmax_mask_scale(0.0)
    model.save_pretrained(args.output_dir, inference=True)
    image_processor_for(config).save_pretrained(args.output_dir)
    reloaded = AutoModelForImageClassification.from_pretrained(args.output_dir)
    print(f"Saved the inference checkpoint to {args.output_dir}; reloaded as {type(reloaded).__name__} "
          f"with attention_mode={reloaded.config.attention_mode!r}")

    classifier = pipeline("image-classification", model=args.output_dir)
    for name in ("astronaut", "camera"):
        predictions = classifier(Image.fromarray(getattr(skimage.data, name)()), top_k=2)
        shown = ", ".join(f"{p['label']} ({p['score']:.3f})" for p in predictions)
        print(f"pipeline('image-classification') on skimage.data.{name}(): {shown}")


if __name__ == "__main__":
    main()
