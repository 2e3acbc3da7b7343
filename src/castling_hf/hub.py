"""Inference checkpoints for the Hub: one function writes the folder, one pushes it, and `model.push_to_hub(...,
inference=True)` is that same push.

A dry run and a real push cannot differ: both write the folder with `write_inference_checkpoint`; the push then
uploads that folder in one commit with `huggingface_hub`'s own `HfApi.upload_folder`. This file imports nothing of
the package but the modeling file (inside a function: that file imports this one), so that it travels with the
modeling code into every saved checkpoint (see `save_pretrained`).
"""

import copy
import os
import tempfile

from huggingface_hub import HfApi, ModelCard

COMMIT_MESSAGE = "Upload Castling-ViT inference checkpoint (linear-angular attention only)"


def write_inference_checkpoint(model, folder, image_processor=None, model_card: ModelCard | None = None, force=False):
    """Write `model`'s inference form to `folder`: the "linear" config with its `auto_map`, the safetensors weights,
    the modeling code, and, when given, the image processor's config and the card (`README.md`).

    Refuses (as `switch_to_inference` does) while any layer's α is not 0, unless `force=True`; `model` itself is not
    changed. `model` may also be a `transformers` task model around a Castling-ViT backbone (e.g.
    `UperNetForSemanticSegmentation`): its folder has no modeling code or `auto_map` (the task model's code is
    `transformers`'), so it loads where castling_hf is installed.
    """
    if hasattr(model, "inference_copy"):  # a Castling-ViT model class
        model.save_pretrained(folder, inference=True, force=force)
    else:
        from .modeling_utils import switch_to_inference  # here: that module imports this one

        switch_to_inference(copy.deepcopy(model), force=force).save_pretrained(folder)
    if image_processor is not None:
        image_processor.save_pretrained(folder)
    if model_card is not None:
        model_card.save(os.path.join(folder, "README.md"))


def push_inference_checkpoint(
    model,
    repo_id: str,
    image_processor=None,
    model_card: ModelCard | None = None,
    dry_run_dir: str | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    force: bool = False,
):
    """Push `model`'s inference form, with its image processor and card when given, to the Hub repo `repo_id` in one
    commit; returns its `CommitInfo`.

    With `dry_run_dir` (a new or empty folder), writes there the folder that would be uploaded, uploads nothing and
    returns that path. The folder is written before the Hub is contacted, so a refused model (α ≠ 0) creates no
    repository.
    """
    if dry_run_dir is not None:
        if os.path.isdir(dry_run_dir) and os.listdir(dry_run_dir):
            raise ValueError(
                f"The dry-run folder {dry_run_dir} is not empty; give a new or empty folder, so that it holds exactly "
                "what would be uploaded (and nothing saved there is overwritten)."
            )
        write_inference_checkpoint(model, dry_run_dir, image_processor, model_card, force=force)
        return dry_run_dir
    with tempfile.TemporaryDirectory() as folder:
        write_inference_checkpoint(model, folder, image_processor, model_card, force=force)
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message or COMMIT_MESSAGE)
