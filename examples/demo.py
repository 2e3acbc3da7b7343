"""`make demo`: train a nano Castling-ViT on the bundled digits, switch it, and use the inference checkpoint.

1. `run_image_classification.py` trains with the Trainer and the mask-decay callback (α: 1 → 0 over the first
   75 % of the steps), evaluates in castling mode and after the switch, and saves the inference checkpoint.
2. The checkpoint is reloaded with `AutoModelForImageClassification` and `pipeline("image-classification")`
   labels a few held-out digits.
"""

import importlib.util
import time
from pathlib import Path

from transformers import AutoModelForImageClassification, pipeline

from castling_hf.data import digits

EXAMPLE = Path(__file__).parent / "image-classification" / "run_image_classification.py"
OUTPUT_DIR = "outputs/demo"
TRAINING = (
    f"--model_name_or_path nano --do_train --do_eval --output_dir {OUTPUT_DIR} --num_train_epochs 25 "
    "--per_device_train_batch_size 32 --learning_rate 2e-3 --warmup_steps 30 --weight_decay 0.05 "
    "--label_smoothing_factor 0.1 --logging_steps 113 --eval_strategy no --save_strategy no --report_to none "
    "--seed 42"
).split()


def load_example():
    spec = importlib.util.spec_from_file_location("run_image_classification", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    started = time.perf_counter()
    results = load_example().main(TRAINING)
    inference_dir = results["inference_dir"]

    model = AutoModelForImageClassification.from_pretrained(inference_dir)
    classifier = pipeline("image-classification", model=inference_dir)
    held_out = digits()["test"].select(range(12))
    predictions = classifier(list(held_out["image"]), top_k=1)
    predicted = [p[0]["label"] for p in predictions]
    truth = [held_out.features["label"].int2str(label) for label in held_out["label"]]

    castling, linear = results["castling"]["eval_castling_accuracy"], results["linear"]["eval_linear_accuracy"]
    print("\n=== Castling-ViT demo: nano, scikit-learn digits ===")
    print(f"training steps                  {results['train']['train_runtime']:.0f} s with the mask decay")
    print(f"test accuracy, castling mode    {castling:.2%}  (α = 0 after the decay)")
    print(f"test accuracy, after the switch {linear:.2%}  (linear-angular attention only)")
    print(f"switch changed accuracy by      {linear - castling:+.2%}")
    print(f"inference checkpoint            {inference_dir}  (attention_mode={model.config.attention_mode!r})")
    print(f"pipeline on 12 held-out digits  predicted {' '.join(predicted)}")
    print(f"                                true      {' '.join(truth)}")
    print(f"total                           {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
