"""Import timm where torchvision cannot be imported: these machines' PyTorch is the CPU build, beside which PyPI's
torchvision fails to load, and timm imports torchvision at import time (for its data transforms and a frozen batch
norm) although MViTv2 uses none of it.

`import_timm()` imports timm as it is where torchvision imports; where it does not, it puts a placeholder package on
`sys.meta_path` for the time of timm's import, answering every `torchvision…` import with empty stand-ins, so that
timm's modules load and its models run on PyTorch alone. Only the tests and benchmarks use it (timm's MViTv2 is their
reference); the package never does, and `transformers` has recorded by then that torchvision is not available, so
its image processors stay the PIL ones. Anything that calls into torchvision would fail loudly on a stand-in.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types


class _StandInType(type):
    """A class whose every attribute is another stand-in class: enough for timm's import-time tables."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _StandInType(name, (), {})


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _StandInType(name, (), {})
        setattr(self, name, value)
        return value


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def torchvision_imports() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:  # PyPI's torchvision beside the CPU build: "operator torchvision::nms does not exist"
        sys.modules.pop("torchvision", None)
        return False
    return True


def import_timm():
    """timm, imported with a torchvision stand-in where the real one cannot be imported (see the module). The
    stand-in is there only while timm imports: afterwards `import torchvision` fails again as it did, so that no other
    library mistakes it for the real one."""
    import transformers  # noqa: F401  (first: it must record that torchvision is not available)

    if "timm" in sys.modules or torchvision_imports():
        import timm

        return timm
    stand_in = _TorchvisionStandIn()
    sys.meta_path.insert(0, stand_in)
    try:
        import timm
    finally:
        sys.meta_path.remove(stand_in)
        for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
            del sys.modules[name]
    return timm


def let_transformers_use_timm():
    """Let `transformers`' `TimmWrapper*` classes use the timm `import_timm` gave: `transformers` counts timm as
    available only with torchvision (`is_timm_available`), so where torchvision is a stand-in it refuses them, and
    its timm_wrapper modules did not import timm. For the tests of castling a `TimmWrapperForImageClassification`."""
    timm = import_timm()
    from transformers.models.timm_wrapper import configuration_timm_wrapper, modeling_timm_wrapper
    from transformers.utils import import_utils

    import_utils.BACKENDS_MAPPING["timm"] = (lambda: True, import_utils.BACKENDS_MAPPING["timm"][1])
    for module in (configuration_timm_wrapper, modeling_timm_wrapper):
        module.timm = timm
    # What the config module imports from timm only where transformers counts timm as available: ImageNet's labels.
    configuration_timm_wrapper.ImageNetInfo = timm.data.ImageNetInfo
    configuration_timm_wrapper.infer_imagenet_subset = timm.data.infer_imagenet_subset
