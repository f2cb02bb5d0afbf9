from setuptools import setup

setup(
    name="refbn",
    version="0.1.0",
    description="Batch Normalization, shown step by step and verified against TensorFlow's fused kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # compare/ and bench/ live at the top of the repository but install as
    # refbn.compare and refbn.bench, so no generic top-level names are added.
    packages=["refbn", "refbn.backends", "refbn.keras", "refbn.compare", "refbn.bench"],
    package_dir={"refbn": "refbn", "refbn.compare": "compare", "refbn.bench": "bench"},
    package_data={"refbn.bench": ["shapes/*.txt"]},
    install_requires=["numpy>=1.24", "numba>=0.59", "ml_dtypes>=0.3", "rich>=13"],
    extras_require={
        "plot": ["matplotlib>=3.7"],
        "tf": ["tensorflow-cpu>=2.16", "keras>=3.0", "tf-keras>=2.16"],
        # torch==2.13.0 exactly: the CPU build these machines keep on disk; plain "torch"
        # (or a range admitting a newer release) pulls a CUDA build of several GB.
        "torch": ["torch==2.13.0"],
        "jax": ["jax>=0.4.30", "flax>=0.10"],
        "onnx": ["onnxruntime>=1.18", "onnx>=1.16"],
        "tutorial": ["matplotlib>=3.7", "nbclient>=0.10", "ipykernel>=6", "nbconvert>=7"],
        "test": ["pytest>=7", "hypothesis>=6"],
        "all": ["matplotlib>=3.7", "tensorflow-cpu>=2.16", "keras>=3.0", "tf-keras>=2.16", "torch==2.13.0",
                "jax>=0.4.30", "flax>=0.10", "onnxruntime>=1.18", "onnx>=1.16", "nbclient>=0.10",
                "ipykernel>=6", "nbconvert>=7", "pytest>=7", "hypothesis>=6"],
    },
    entry_points={"console_scripts": ["refbn=refbn.cli:main"]},
)
