"""What every Castling family's models share (docs/design.md §2): the softmax branch of every Castling layer in a
model (α, the kept share, the switch to the inference form), the mixin that gives each family's `PreTrainedModel`
those as methods with `save_pretrained(..., inference=True)` / `push_to_hub(..., inference=True)`, the remote code a
saved checkpoint carries, and the small checks and initialisers the families' forward passes and `_init_weights` use.
"""

import copy
import re
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils.output_capturing import (
    _CAN_RECORD_REGISTRY,
    resolve_hidden_states_indices,
    selected_hidden_states,
)

from .attention import CastlingResidualConv, CastlingSoftmaxBranch
from .configuration_utils import CastlingAttentionConfig
from .hub import push_inference_checkpoint


def check_no_attentions_asked(kwargs: dict, config: CastlingAttentionConfig) -> None:
    """Refuse `output_attentions=True` rather than return `None` for it: there are no attention maps to give."""
    if kwargs.get("output_attentions", config.output_attentions):
        raise ValueError(
            "output_attentions=True, but a Castling model has no attention maps to return: its linear-angular "
            "attention never forms the tokens × tokens matrix (that is what makes it linear), and the training form's "
            "softmax branch is computed in tiles that are not kept. Leave output_attentions unset; hidden states are "
            "available with output_hidden_states."
        )


def kept_hidden_states(model, output_hidden_states, count: int) -> set[int]:
    """The indices of the `count` hidden states that `output_hidden_states` asks for: all of them for `True`, the
    selected ones for an index or a list of indices (negative ones from the end), none for a false value; as
    `transformers`' `capture_outputs` reads it."""
    if not output_hidden_states:
        return set()
    selected = selected_hidden_states(output_hidden_states)
    if selected is None:
        return set(range(count))
    return resolve_hidden_states_indices(model, selected, num_hidden_states=count)


class CastlingDropPath(nn.Module):
    """Stochastic depth (`drop_path_rate`): in training, a residual branch is zeroed for a whole image with probability
    `drop_prob` and the kept ones are scaled by 1/(1 − p), so that its expected value is unchanged; the identity in
    evaluation."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return hidden_states
        keep = 1.0 - self.drop_prob
        mask = hidden_states.new_empty((hidden_states.shape[0],) + (1,) * (hidden_states.dim() - 1)).bernoulli_(keep)
        return hidden_states * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def init_fan_in_uniform_(weight: torch.Tensor) -> torch.Tensor:
    """U(-1/√fan_in, 1/√fan_in), PyTorch's default for linear and conv weights; fan_in = the inputs of one output."""
    bound = weight[0].numel() ** -0.5
    return init.uniform_(weight, -bound, bound)


def softmax_branches(model: nn.Module) -> dict[str, CastlingSoftmaxBranch]:
    """Every Castling softmax branch inside `model`, by module name: in a Castling model of any family, or in any model
    that holds Castling layers (e.g. a `UperNetForSemanticSegmentation` with a `CastlingViTBackbone`)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, CastlingSoftmaxBranch)}


def softmax_mask_scales(model: nn.Module) -> dict[str, float]:
    """α of every Castling layer in `model`, by the name of its softmax branch (empty in the inference form)."""
    return {name: branch.softmax_mask_scale.item() for name, branch in softmax_branches(model).items()}


def measure_softmax_mask_kept_shares(model: nn.Module, enabled: bool = True) -> None:
    """Turn on (or off) the count of the probabilities each Castling layer's mask keeps, from the next forward pass
    on; `softmax_mask_kept_shares` reads it. Off by default: the count costs a pass over every tile of scores."""
    for branch in softmax_branches(model).values():
        branch.measure_kept_share = enabled


def softmax_mask_kept_shares(model: nn.Module) -> dict[str, float]:
    """The share of softmax probabilities each layer's mask kept in the last forward pass, by the name of its
    softmax branch: whether the branch is alive (0 means it added nothing and passed no gradient). Measured only
    while `measure_softmax_mask_kept_shares(model)` is on; empty in the inference form, and without the layers whose
    α is 0 (they do no work)."""
    return {
        name: branch.kept_share.item()
        for name, branch in softmax_branches(model).items()
        if branch.kept_share is not None
    }


def set_softmax_mask_scale(model: nn.Module, alpha: float) -> None:
    """Set α, the weight of the auxiliary softmax branch, on every Castling layer in `model`. α must lie in [0, 1]."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"The softmax mask scale α must lie in [0, 1], got {alpha}.")
    branches = softmax_branches(model)
    if not branches and alpha != 0.0:
        raise ValueError(
            f"{type(model).__name__} has no Castling softmax branch (a model in attention_mode='linear', or one "
            f"without Castling layers), so α can only be 0; got {alpha}. Build it with attention_mode='castling' to "
            "train with the branch."
        )
    for branch in branches.values():
        branch.set_scale(alpha)


def switch_to_inference(model: nn.Module, force: bool = False) -> nn.Module:
    """Drop the softmax branch of every Castling layer in `model` and record `attention_mode="linear"` in every
    Castling config it holds (its own, its modules', and a nested `backbone_config`), in place; returns `model`.

    Its `save_pretrained` then writes no softmax-branch tensors, and its Auto class reloads the linear form.
    Refuses while any α is not 0, since the linear form would then not compute what this model computes, unless
    `force=True`.
    """
    branches = softmax_branches(model)
    live = {name: alpha for name, alpha in softmax_mask_scales(model).items() if alpha != 0.0}
    if live and not force:
        name, alpha = next(iter(live.items()))
        raise ValueError(
            f"Cannot switch to the inference form: the softmax branch {name} still has softmax mask scale "
            f"α = {alpha:g} ({len(live)} of {len(branches)} layers have α ≠ 0), so dropping it would change the "
            "model's outputs. Finish the mask decay first (CastlingMaskDecayCallback, or "
            "set_softmax_mask_scale(model, 0.0)), or pass force=True to drop the branch anyway."
        )
    for module in model.modules():
        if isinstance(getattr(module, "softmax_branch", None), CastlingSoftmaxBranch):  # a Castling attention
            module.softmax_branch = None
        config = getattr(module, "config", None)
        for candidate in (config, getattr(config, "backbone_config", None)):
            if isinstance(candidate, CastlingAttentionConfig):
                candidate.attention_mode = "linear"
        if isinstance(getattr(config, "castling", None), dict):  # a tower castled in place (in_place.py)
            config.castling["attention_mode"] = "linear"
    return model


class CastlingMethods:
    """The softmax mask scale α, the switch and the inference checkpoint as methods of a model that holds Castling
    layers: a Castling family's `PreTrainedModel` (`CastlingModelMixin`), or a `transformers` task model that `castle`
    returned (`in_place.with_holder_methods`)."""

    def softmax_mask_scales(self) -> dict[str, float]:
        """α of every layer, by the name of its softmax branch module (empty in the inference form)."""
        return softmax_mask_scales(self)

    def softmax_mask_kept_shares(self) -> dict[str, float]:
        """The share of softmax probabilities each layer's mask kept in the last forward pass (see the function)."""
        return softmax_mask_kept_shares(self)

    def measure_softmax_mask_kept_shares(self, enabled: bool = True) -> None:
        """Turn the count behind `softmax_mask_kept_shares` on or off (see the function)."""
        measure_softmax_mask_kept_shares(self, enabled)

    def set_softmax_mask_scale(self, alpha: float) -> None:
        """Set α, the weight of the auxiliary softmax branch, on every layer. α must lie in [0, 1]."""
        set_softmax_mask_scale(self, alpha)

    def switch_to_inference(self, force: bool = False):
        """Drop the softmax branch of every layer and set `attention_mode="linear"`, in place; returns the model.
        Refuses while any α is not 0, unless `force=True` (see the function)."""
        return switch_to_inference(self, force=force)

    def inference_copy(self, force: bool = False):
        """A copy of this model in the inference form; this model is left as it is."""
        if not softmax_branches(self):
            return self
        return switch_to_inference(copy.deepcopy(self), force=force)

    def save_pretrained(self, save_directory, *args, inference: bool = False, force: bool = False, **kwargs):
        """`PreTrainedModel.save_pretrained`; with `inference=True`, saves the inference form (`switch_to_inference`
        on a copy: this model is left as it is), refusing while any α is not 0 unless `force=True`."""
        if inference:
            return self.inference_copy(force=force).save_pretrained(save_directory, *args, **kwargs)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def push_to_hub(self, repo_id: str, *args, inference: bool = False, force: bool = False, **kwargs):
        """`PreTrainedModel.push_to_hub`; with `inference=True`, pushes the inference form (see `switch_to_inference`)
        in one commit through `hub.push_inference_checkpoint` (`commit_message`, `private` and `token` apply)."""
        if inference:
            options = {name: kwargs.pop(name) for name in ("commit_message", "private", "token") if name in kwargs}
            if args or kwargs:
                raise TypeError(
                    f"push_to_hub(inference=True) takes repo_id, commit_message, private, token and force; got "
                    f"{len(args)} more positional and {sorted(kwargs)}."
                )
            return push_inference_checkpoint(self, repo_id, force=force, **options)
        return super().push_to_hub(repo_id, *args, **kwargs)


class CastlingModelMixin(CastlingMethods):
    """`CastlingMethods` for a Castling family's `PreTrainedModel` (which lists its model classes by Auto class in
    `remote_auto_classes`); its checkpoints also carry the family's code."""

    remote_auto_classes: dict[str, type] = {}

    def save_pretrained(self, save_directory, *args, inference: bool = False, force: bool = False, **kwargs):
        """`PreTrainedModel.save_pretrained`; with `inference=True`, saves the inference form (`switch_to_inference`).

        The folder also carries the family's code (`write_remote_code`) and the config an `auto_map` for every Auto
        class of the family, so that any of them loads it with `trust_remote_code=True` where castling_hf is not
        installed.
        """
        if inference:
            return self.inference_copy(force=force).save_pretrained(save_directory, *args, **kwargs)
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **remote_auto_map(type(self))}
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(type(self), save_directory)
        return saved


def reclassed(model: nn.Module, subclass: type) -> nn.Module:
    """`model` made an instance of `subclass` (a subclass of its class), in place. `transformers` records each model
    class's outputs to capture (`hidden_states` for `output_hidden_states`) by class when a model is built, so the
    subclass is recorded as its parent was: without it, a caller asking for hidden states (LLaVA's
    `vision_feature_layer`) would get None."""
    model.__class__ = subclass
    if isinstance(model, PreTrainedModel):
        _CAN_RECORD_REGISTRY[model] = model._can_record_outputs
    return model


# A package-relative import (`from ...attention import`, `from .configuration_castling_vit import`) and its parts.
RELATIVE_IMPORT = re.compile(r"^(\s*from\s+)(\.+)([\w.]*)(\s+import\b)", re.MULTILINE)


def remote_auto_map(model_class: type) -> dict[str, str]:
    """`auto_map` entries for the config and every model class of `model_class`'s family, as `module.Class` in the
    flat folder `write_remote_code` writes."""
    classes = {"AutoConfig": model_class.config_class, **model_class.remote_auto_classes}
    return {auto: f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}" for auto, cls in classes.items()}


def write_remote_code(model_class: type, folder) -> list[Path]:
    """Copy into `folder` the module of `model_class`, its config's, and every module of the package they import,
    flat (a checkpoint is one folder), each package-relative import made folder-relative: the files
    `trust_remote_code=True` loads. (`transformers`' own copier follows only imports from the module's own folder;
    a family's modeling file imports the shared attention from the package above it.)"""
    modules = [Path(sys.modules[cls.__module__].__file__) for cls in (model_class, model_class.config_class)]
    written = []
    for path in relative_import_closure(modules):
        target = Path(folder) / path.name
        target.write_text(RELATIVE_IMPORT.sub(lambda m: f"{m[1]}.{m[3].rsplit('.', 1)[-1]}{m[4]}", path.read_text()))
        written.append(target)
    return written


def relative_import_closure(paths: list[Path]) -> list[Path]:
    """`paths` and the files of every module they import relatively, recursively (imports inside functions too)."""
    seen, pending = [], list(paths)
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.append(path)
        for _, dots, module, _ in RELATIVE_IMPORT.findall(path.read_text()):
            package = path.parent
            for _ in range(len(dots) - 1):
                package = package.parent
            pending.append(package.joinpath(*module.split(".")).with_suffix(".py"))
    return seen


@torch.no_grad()
def init_castling_tensors(module: nn.Module, config: CastlingAttentionConfig) -> None:
    """`_init_weights` for what every Castling family has, after `PreTrainedModel`'s own: linear and conv weights per
    `config.weight_init` (biases stay 0), γ at `linear_branch_scale_init`, and α at 1 (a loaded α keeps its value)."""
    if isinstance(module, (nn.Linear, nn.Conv2d, CastlingResidualConv)):
        if config.weight_init == "fan_in":
            init_fan_in_uniform_(module.weight)
        else:
            init.normal_(module.weight, mean=0.0, std=config.initializer_range)
    if isinstance(getattr(module, "linear_branch_scale", None), nn.Parameter):  # a Castling attention
        init.constant_(module.linear_branch_scale, float(config.linear_branch_scale_init))
    if isinstance(module, CastlingSoftmaxBranch):
        init.ones_(module.softmax_mask_scale)  # skipped for a loaded α, which keeps its value


__all__ = [
    "CastlingDropPath",
    "CastlingMethods",
    "CastlingModelMixin",
    "check_no_attentions_asked",
    "init_castling_tensors",
    "init_fan_in_uniform_",
    "kept_hidden_states",
    "reclassed",
    "measure_softmax_mask_kept_shares",
    "remote_auto_map",
    "set_softmax_mask_scale",
    "softmax_branches",
    "softmax_mask_kept_shares",
    "softmax_mask_scales",
    "switch_to_inference",
    "write_remote_code",
]
