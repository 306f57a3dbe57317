import contextlib

import pytest
import torch

from lmadapt.testing import tiny_llama, tiny_tokenizer


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture
def one_thread():
    """For modules of tiny models: their matmuls are too small to share, so one thread is faster, and much
    faster on a busy machine. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model():
    return tiny_llama()


TOPICS = {
    "sport": ["match", "goal", "team", "league", "coach"],
    "tech": ["chip", "software", "phone", "robot", "code"],
    "food": ["bread", "soup", "cheese", "spice", "fruit"],
}


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Prompt/completion rows of a toy topic task: the topic word is determined by the prompt's words."""
    import random

    rng = random.Random(seed)
    rows = []
    names = sorted(TOPICS)
    for i in range(n):
        topic = names[i % len(names)]
        words = " ".join(rng.choice(TOPICS[topic]) for _ in range(rng.randint(3, 12)))
        rows.append({"prompt": f"Text: {words}\nTopic:", "completion": f" {topic}"})
    return rows


def write_jsonl(path, rows) -> None:
    import json

    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama and its byte-level tokenizer saved as a normal transformers folder."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def train_file(tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, make_rows(48))
    return path


@pytest.fixture
def run_config(tiny_model_dir, train_file, tmp_path):
    """A small but complete run config dict on the tiny model."""
    return {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": [str(train_file)], "max_length": 128, "validation_fraction": 0.125},
        "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {"lr": 5e-3, "batch_size": 4, "max_steps": 6, "tensorboard": False, "schedule": "constant",
                  "threads": 2},  # a fixed count: exact-resume tests compare runs bit for bit
        "output_dir": str(tmp_path / "run"),
    }


@contextlib.contextmanager
def interrupted_at(step: int):
    """Training raises KeyboardInterrupt (as Ctrl-C or a kill would stop it) when ``step`` steps are done: the
    run's last complete checkpoint is what a resume starts from."""
    from lmadapt.training.loop import Trainer

    original = Trainer._step

    def step_or_interrupt(self):
        if self.state["step"] == step:
            raise KeyboardInterrupt
        return original(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "_step", step_or_interrupt)
        yield
