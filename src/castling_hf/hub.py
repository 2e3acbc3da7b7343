"""Inference checkpoints for the Hub: one function writes the folder, the other uploads exactly that folder.

A dry run and a real push therefore cannot differ: both call `write_inference_checkpoint`; the push then hands the
folder's files to `huggingface_hub`'s own `HfApi.create_commit` (as `transformers`' `push_to_hub` does).
"""

import os
import tempfile

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard


def write_inference_checkpoint(model, folder, image_processor=None, model_card: ModelCard | None = None, force=False):
    """Write `model`'s inference form to `folder`: the "linear" config with its `auto_map`, the safetensors weights,
    the modeling code, the image processor's config and the card (`README.md`).

    Refuses (as `switch_to_inference` does) while any layer's α is not 0, unless `force=True`; `model` itself is not
    changed.
    """
    model.save_pretrained(folder, inference=True, force=force)
    if image_processor is not None:
        image_processor.save_pretrained(folder)
    if model_card is not None:
        model_card.save(os.path.join(folder, "README.md"))


COMMIT_MESSAGE = "Upload Castling-ViT inference checkpoint (linear-angular attention only)"


def upload_checkpoint_folder(folder, repo_id: str, commit_message: str = COMMIT_MESSAGE, private=None, token=None):
    """Upload every file of `folder` to the Hub repo `repo_id` (created if needed) in one commit; returns its
    `CommitInfo`."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name)) for name in sorted(os.listdir(folder))
    ]
    return api.create_commit(repo_id, operations=operations, commit_message=commit_message)


def push_inference_checkpoint(
    model,
    repo_id: str,
    image_processor=None,
    model_card: ModelCard | None = None,
    dry_run_dir: str | None = None,
    commit_message: str = COMMIT_MESSAGE,
    private: bool | None = None,
    token: str | None = None,
    force: bool = False,
):
    """Push `model`'s inference form, with its image processor and card, to the Hub repo `repo_id`.

    With `dry_run_dir` (a new or empty folder), writes there the folder that would be uploaded and uploads nothing;
    returns that path. Otherwise returns the `CommitInfo` of the upload. The folder is written before the Hub is
    contacted, so a refused model (α ≠ 0) creates no repository.
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
        return upload_checkpoint_folder(folder, repo_id, commit_message, private=private, token=token)
