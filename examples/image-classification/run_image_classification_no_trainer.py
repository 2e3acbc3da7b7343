#!/usr/bin/env python
"""Train a Castling-ViT image classifier with a plain loop on `accelerate`, decaying the softmax mask with
`castling_hf.softmax_mask_scale`, then switch to linear-angular attention and save the inference checkpoint.

In the manner of `transformers`' run_image_classification_no_trainer.py; the same code runs on one CPU, several
CPU processes, or GPUs and nodes. Two CPU processes on one machine (DDP over gloo):

    accelerate launch --multi_gpu --num_processes 2 \\
        examples/image-classification/run_image_classification_no_trainer.py --cpu --output_dir outputs/digits-ddp

(`accelerate launch` starts several processes through torchrun only with `--multi_gpu`; `--cpu` on the launcher
starts one process unless mpirun is set up. `--cpu` on the script keeps each process on the CPU.)

Data, model and transforms are those of run_image_classification.py beside this file.
"""

import argparse
import hashlib
import json
import math
import os

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from run_image_classification import (
    DataTrainingArguments,
    ModelArguments,
    collate,
    load_image_dataset,
    load_model_and_processor,
    make_transform,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from castling_hf import clear_held_gradients, softmax_mask_scale
from castling_hf.hub import push_inference_checkpoint, write_inference_checkpoint
from castling_hf.metrics import Accuracy
from castling_hf.model_card import training_run_card


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name_or_path", default="nano", help="A size name or a checkpoint.")
    parser.add_argument("--dataset_name", default=None, help="A Hub data set; default: the bundled digits.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--per_device_train_batch_size", type=int, default=32)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--num_train_epochs", type=int, default=20)
    parser.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    parser.add_argument("--num_warmup_steps", type=int, default=30)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--mask_decay_start", type=float, default=0.0)
    parser.add_argument("--mask_decay_end", type=float, default=0.75)
    parser.add_argument("--mask_decay_schedule", default="cosine")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cpu", action="store_true", help="Train on the CPU even where an accelerator exists.")
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id", default=None)
    return parser.parse_args(argv)


def parameter_digest(model: torch.nn.Module) -> str:
    """A hash of every parameter's bytes: equal on every rank iff the replicas hold identical weights."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def evaluate_accuracy(accelerator, model, dataloader) -> float:
    metric = Accuracy()
    model.eval()
    for batch in dataloader:
        with torch.no_grad():
            logits = model(pixel_values=batch["pixel_values"]).logits
        predictions, references = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
        metric.add_batch(predictions=predictions, references=references)
    return metric.compute()["accuracy"]


def main(argv=None):
    args = parse_args(argv)
    accelerator = Accelerator(cpu=args.cpu, gradient_accumulation_steps=args.gradient_accumulation_steps)
    set_seed(args.seed)

    data_args = DataTrainingArguments(dataset_name=args.dataset_name, max_train_samples=args.max_train_samples)
    with accelerator.main_process_first():
        dataset = load_image_dataset(data_args, args.seed)
    labels = dataset["train"].features[data_args.label_column_name].names
    model, image_processor = load_model_and_processor(
        ModelArguments(model_name_or_path=args.model_name_or_path), labels
    )
    columns = (data_args.image_column_name, data_args.label_column_name)
    dataset["train"].set_transform(
        make_transform(image_processor, *columns, True, args.seed + accelerator.process_index)
    )
    dataset["test"].set_transform(make_transform(image_processor, *columns, False, args.seed))
    train_loader = DataLoader(
        dataset["train"], shuffle=True, collate_fn=collate, batch_size=args.per_device_train_batch_size
    )
    eval_loader = DataLoader(dataset["test"], collate_fn=collate, batch_size=args.per_device_eval_batch_size)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)  # per process, once prepared
    total_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    # A prepared scheduler steps once per process on every optimizer step, hence the factor.
    scheduler = accelerator.prepare(
        get_scheduler(
            "linear",
            optimizer,
            num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
            num_training_steps=total_steps * accelerator.num_processes,
        )
    )
    castling_model = accelerator.unwrap_model(model)

    progress = tqdm(range(total_steps), disable=not accelerator.is_local_main_process, desc="training")
    completed_steps = 0
    while completed_steps < total_steps:
        model.train()
        for batch in train_loader:
            alpha = softmax_mask_scale(
                completed_steps, total_steps, args.mask_decay_start, args.mask_decay_end, args.mask_decay_schedule
            )
            castling_model.set_softmax_mask_scale(alpha)
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                clear_held_gradients(castling_model)  # a held γ (castled models) leaves the step untouched
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                completed_steps += 1
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.3f}", softmax_mask_scale=f"{alpha:.3f}")
            if completed_steps >= total_steps:
                break
    castling_model.set_softmax_mask_scale(
        softmax_mask_scale(
            total_steps, total_steps, args.mask_decay_start, args.mask_decay_end, args.mask_decay_schedule
        )
    )

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # The training form as it ended (α = 0), as the Trainer's save_model() leaves it: it can be resumed from.
        castling_model.save_pretrained(args.output_dir)
        image_processor.save_pretrained(args.output_dir)

    results = {"castling_accuracy": evaluate_accuracy(accelerator, castling_model, eval_loader)}
    castling_model.switch_to_inference()
    results["linear_accuracy"] = evaluate_accuracy(accelerator, castling_model, eval_loader)

    print(
        f"rank {accelerator.process_index} of {accelerator.num_processes}: parameter digest "
        f"{parameter_digest(castling_model)}",
        flush=True,
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        results.update(steps=completed_steps, processes=accelerator.num_processes)
        with open(os.path.join(args.output_dir, "results.json"), "w") as file:
            json.dump(results, file, indent=2)
        print(json.dumps(results), flush=True)
        repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
        card = training_run_card(
            castling_model, repo_id, {"accuracy": results["linear_accuracy"]}, "", args.dataset_name or "digits"
        )
        inference_dir = os.path.join(args.output_dir, "inference")
        write_inference_checkpoint(castling_model, inference_dir, image_processor, card)
        print(f"rank {accelerator.process_index} saved the inference checkpoint to {inference_dir}", flush=True)
        if args.push_to_hub:
            push_inference_checkpoint(castling_model, repo_id, image_processor, card)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
