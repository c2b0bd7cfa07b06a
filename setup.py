from setuptools import find_packages, setup

setup(
    name="lmms_sd",
    version="0.1.0",
    description="Speculative decoding for vision-language models, as lmms-eval model classes",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lmms_sd", "lmms_sd.*"]),
    include_package_data=True,
    package_data={"lmms_sd": ["assets/**/*", "tasks/**/*"]},
    install_requires=[
        # Loose lower bounds for installing into one's own environment; the exact tested set
        # is launch/constraints.txt (bash launch/install.sh). Upper bounds only where known:
        "lmms-eval>=0.7.3",
        "filelock<4",  # 4.x dropped filelock._api, which lmms-eval 0.7.3's evaluator imports
        "torch>=2.1",
        "transformers>=5.0",
        "accelerate>=1.0",
        "huggingface_hub>=1.0",
        "pillow",
        "safetensors",
        "scikit-learn",
        "tqdm",
        "matplotlib",
        "pandas",
        "pyarrow",
    ],
    extras_require={
        "gpu": ["flash-attn", "deepspeed"],
        "test": ["pytest", "scipy"],
    },
    entry_points={
        "console_scripts": ["lmms-sd=lmms_sd.cli:main"],
        "lmms_eval.models": ["lmms_sd=lmms_sd.lmms_eval.registry:MANIFESTS"],
    },
)
