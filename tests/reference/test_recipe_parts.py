"""Small parts of the reference recipe: corpus split, windows, sampler, schedule, prompts."""

from __future__ import annotations

from pathlib import Path

import torch

from dspark_ray.reference import corpus, data, prompts
from dspark_ray.reference.trainer import TrainConfig, lr_at


def test_heldout_split_is_stable_and_small():
    assert corpus.is_heldout(Path("ast.py")) == corpus.is_heldout(Path("ast.py"))
    train, heldout = corpus.split_files()
    assert 0.01 < len(heldout) / (len(train) + len(heldout)) < 0.06
    assert not any(part in ("test", "tests") for path in train for part in path.parts[:-1])


def test_windows_hold_inputs_and_shifted_labels():
    stream = torch.arange(11)
    windows = data.windows(stream, seq_len=4)  # [2, 5]
    assert windows.tolist() == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]]


def test_sampler_is_seeded():
    windows = torch.arange(40).view(10, 4)
    first = [data.WindowSampler(windows, 3, seed=1).next_batch() for _ in range(2)]
    second = [data.WindowSampler(windows, 3, seed=1).next_batch() for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_lr_warms_up_then_decays_to_floor():
    config = TrainConfig(steps=100, batch_size=1, seq_len=1, lr=1.0, warmup_steps=10)
    assert lr_at(0, config) == 0.1 and lr_at(9, config) == 1.0
    assert abs(lr_at(100, config) - config.min_lr_ratio) < 1e-9
    assert lr_at(50, config) < lr_at(20, config)


def test_prompt_openings_end_at_the_body():
    source = "import os\n\n\n@decorator\ndef handle(request, *, timeout=10.0, retries=3):\n" \
        '    """Handle a request with a timeout and retries."""\n    return None\n'
    (opening,) = prompts._openings(source)
    assert opening.startswith("@decorator\ndef handle(")
    assert opening.endswith('retries."""\n')
