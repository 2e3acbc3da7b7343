#!/usr/bin/env python
"""Push a trained Castling-ViT to the Hub as an inference checkpoint: the "linear" config, safetensors weights, the
modeling code (so it loads with `trust_remote_code=True` anywhere), the image processor and a model card.

    python examples/push_inference_checkpoint.py outputs/demo/inference --repo_id my-org/castling-vit-nano-digits
    python examples/push_inference_checkpoint.py outputs/demo --dataset_name digits \\
        --repo_id my-org/castling-vit-nano-digits --dry_run outputs/dry-run   # writes the folder, uploads nothing

The checkpoint may be in the training form (α must have decayed to 0; `--force` drops a live branch anyway) or
already in the inference form. The card's results come from the run's `eval_results.json` in the checkpoint folder
(the Trainer examples' output directory; say on which data with `--dataset_name`), or from the card already in it
(the examples' `inference` folders carry one).
"""

import argparse
import json
from pathlib import Path

from huggingface_hub import ModelCard
from transformers import AutoConfig, AutoImageProcessor

import castling_hf  # noqa: F401  (registers the Auto classes)
from castling_hf import CastlingViTPreTrainedModel
from castling_hf.hub import push_inference_checkpoint
from castling_hf.model_card import castling_model_card, eval_results_from_metrics, pipeline_tag_for

MODEL_CLASSES = {
    model_class.__name__: model_class for model_class in CastlingViTPreTrainedModel.remote_auto_classes.values()
}


def measured_results(checkpoint: Path, dataset_name: str | None, task: str, parser) -> tuple[list, str | None]:
    """The card's results: the run's `eval_results.json` in the checkpoint folder (written by the Trainer examples),
    else the results of a card already there (an `inference` folder's), else none."""
    metrics_path = checkpoint / "eval_results.json"
    if metrics_path.is_file():
        if dataset_name is None:
            parser.error(f"{metrics_path} holds results; say which data set they were measured on with --dataset_name.")
        metrics = json.loads(metrics_path.read_text())
        source = "the training run's evaluation after the switch (its eval_results.json)"
        return eval_results_from_metrics(metrics, "eval_linear_", task, dataset_name), source
    card_path = checkpoint / "README.md"
    if card_path.is_file():
        results = ModelCard.load(card_path).data.eval_results or []
        return results, "the evaluation recorded in the checkpoint's own card" if results else None
    return [], None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a directory saved by save_pretrained (training or inference form)")
    parser.add_argument("--repo_id", required=True, help="the Hub repository, e.g. my-org/castling-vit-small")
    parser.add_argument("--dry_run", metavar="DIR", default=None, help="write the upload folder here; push nothing")
    parser.add_argument("--dataset_name", default=None, help="the data set of the results in eval_results.json")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", default=None)
    parser.add_argument("--force", action="store_true", help="drop the softmax branch even if α is not 0")
    args = parser.parse_args(argv)

    checkpoint = Path(args.checkpoint)
    config = AutoConfig.from_pretrained(checkpoint)
    architecture = (config.architectures or [None])[0]
    if config.model_type != "castling_vit" or architecture not in MODEL_CLASSES:
        parser.error(
            f"{checkpoint} holds a {config.model_type!r} model ({architecture}); this script pushes Castling-ViT "
            f"checkpoints of the classes {sorted(MODEL_CLASSES)}."
        )
    model = MODEL_CLASSES[architecture].from_pretrained(checkpoint)
    model.switch_to_inference(force=args.force)  # refuses here, before anything is written, while α ≠ 0
    image_processor = AutoImageProcessor.from_pretrained(checkpoint)

    task = pipeline_tag_for(architecture)
    results, source = measured_results(checkpoint, args.dataset_name, task, parser)
    card = castling_model_card(
        model.config,
        model_name=args.repo_id.split("/")[-1],
        architecture=architecture,
        eval_results=results,
        datasets=sorted({result.dataset_type for result in results}) or None,
        results_source=source,
    )
    result = push_inference_checkpoint(
        model,
        args.repo_id,
        image_processor,
        card,
        dry_run_dir=args.dry_run,
        private=args.private or None,
        token=args.token,
    )
    if args.dry_run:
        print(f"dry run: the folder that would be uploaded to {args.repo_id} is {args.dry_run}:")
        for name in sorted(p.name for p in Path(args.dry_run).iterdir()):
            print(f"  {name}")
    else:
        print(f"pushed to {args.repo_id}: {result}")
    return result


if __name__ == "__main__":
    main()
