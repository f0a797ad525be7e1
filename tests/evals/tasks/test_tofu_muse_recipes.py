"""The TOFU and MUSE GPU recipes load as written and suit their tasks."""

from __future__ import annotations

from pathlib import Path

import pytest

from retainfirst.config import load_config
from retainfirst.evals.tasks import get_task

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
RECIPES = sorted(CONFIGS.glob("tofu_*.yaml"), key=lambda p: p.stem) + sorted(
    CONFIGS.glob("muse_*.yaml"), key=lambda p: p.stem
)


def test_there_are_four_tofu_methods_and_two_muse_corpora():
    names = [p.stem for p in RECIPES]
    assert names == [
        "tofu_llama2_ga",
        "tofu_llama2_graddiff",
        "tofu_llama2_npo",
        "tofu_llama2_simnpo",
        "muse_books_npo_gdr",
        "muse_news_npo_gdr",
    ]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_as_written_and_suits_its_task(path):
    config = load_config(path)
    assert config.name == path.stem
    assert config.train.forget_loss in ("ga", "npo", "simnpo")
    assert config.synthesizers == ["sum", "pcgrad", "sago"]
    task = get_task(config.eval.tasks[0])
    assert task.name == path.stem.split("_")[0]  # tofu_* recipes evaluate tofu, muse_* muse
    task.check_config(config)
    if task.name == "tofu":
        assert config.data.source == "tofu" and config.data.tofu_split == "forget10"
