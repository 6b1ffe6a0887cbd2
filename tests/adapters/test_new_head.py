"""A classifier trained on a headless base: the adapter records the trained class and labels, so
the folded directory loads as that classifier and exports as sequence classification."""

from __future__ import annotations

import torch
import transformers

import hypermerge as hm
from tests.helpers.common import tiny_config


def test_a_new_head_on_a_headless_base_folds_into_that_classifier(tmp_path):
    torch.manual_seed(0)
    transformers.BertModel(tiny_config("bert")).save_pretrained(tmp_path / "base")  # architectures: BertModel
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "base", num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    hm.inject(model, hm.HyperAdaptConfig(modules_to_save=("classifier",)))
    hm.save_adapter(model, tmp_path / "adapter", base_model=tmp_path / "base")

    overrides = hm.read_adapter(tmp_path / "adapter").config_overrides
    assert overrides["architectures"] == ["BertForSequenceClassification"]
    hm.fold_checkpoint(tmp_path / "adapter", tmp_path / "folded", progress=False)
    config = transformers.AutoConfig.from_pretrained(tmp_path / "folded")
    assert config.architectures == ["BertForSequenceClassification"]
    assert config.id2label == {0: "negative", 1: "positive"}
