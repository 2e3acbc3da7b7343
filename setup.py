from setuptools import find_packages, setup

setup(
    name="castling-hf",
    version="0.1.0",
    description="Castling-ViT (CVPR 2023) as a Hugging Face Transformers model family: "
    "train with linear-angular + masked softmax attention, infer with linear-angular attention alone.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    package_dir={"": "src"},
    packages=find_packages("src"),
    python_requires=">=3.10",
    install_requires=[
        # torch==2.13.0 is installed first by the Makefile; this range accepts it, so pip adds no CUDA build.
        "torch>=2.6",  # transformers 5's own floor; FlexAttention's log-sum-exp has a fallback for torch < 2.9
        "transformers>=5.0,<6",
        "datasets>=3.0",
        "accelerate>=1.0",
        "evaluate>=0.4",
        "safetensors>=0.4",
        "huggingface-hub>=1.0",
        "scipy>=1.10",
        "pillow>=10",
        "pycocotools>=2.0.7",  # the COCO evaluator behind detection mAP
        "torchmetrics>=1.0",  # the confusion matrix behind segmentation mean IoU
        "scikit-learn>=1.3",  # castling_hf.data.digits(): the examples' default data
        "matplotlib>=3.7",  # the examples' training plots and the benchmarks' figures
    ],
    extras_require={
        # Castling timm's MViTv2 from a timm checkpoint (castle() takes a timm model object without it).
        "timm": ["timm>=1.0.20"],
        # scikit-image ships the real photos the tests and the demo classify. timm is installed by the Makefile
        # without its dependencies: its torchvision does not import beside the CPU build of torch these machines
        # use, and an installed torchvision would turn transformers' image processors to it.
        "dev": [
            "pytest>=8",
            "ruff>=0.6",
            "scikit-image>=0.22",
            "onnx>=1.16",
            "onnxscript",
            "onnxruntime>=1.18",
            # the manual (make docs), whose strict build make test runs
            "mkdocs>=1.6",
            "mkdocs-material>=9.5",
            "mkdocstrings[python]>=0.26",
        ],
    },
)
