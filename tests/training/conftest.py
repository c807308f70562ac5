"""Shared fixtures for the training tests: hermetic caches, a small corpus and a tokenizer."""

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` (a script, not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True, scope="session")
def _hermetic_caches(tmp_path_factory):
    """Keep datasets' and this library's caches out of the user's home directory."""
    import datasets

    root = tmp_path_factory.mktemp("caches")
    mp = pytest.MonkeyPatch()
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf_datasets")
    mp.setenv("HOOKED_BILINEAR_CACHE", str(root / "hooked_bilinear"))
    yield root
    mp.undo()


@pytest.fixture(scope="session")
def story_texts():
    from training.stories import generate_stories

    return generate_stories(300, seed=0)


@pytest.fixture(scope="session")
def tokenizer_dir(story_texts, tmp_path_factory):
    from training.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(story_texts, vocab_size=1024, save_dir=path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from training.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each test builds its own Accelerator (accelerate keeps process-wide singletons)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
