"""The runner hands the KV cache to a model under the name its forward takes: transformers renamed
`past_key_values` to `cache` during 5.x, and the GPU image we check on still has 5.17."""

from __future__ import annotations

import inspect

from torch import nn

from dspark_ray.engine.runner import cache_keyword


class Before(nn.Module):
    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None, **kwargs):
        raise NotImplementedError


class After(nn.Module):
    def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=None, **kwargs):
        raise NotImplementedError


def test_the_cache_goes_by_the_name_the_forward_takes() -> None:
    assert cache_keyword(Before()) == "past_key_values"
    assert cache_keyword(After()) == "cache"


def test_the_installed_transformers_takes_the_name_chosen(tiny) -> None:
    target = tiny("llama").target
    assert cache_keyword(target) in inspect.signature(target.forward).parameters
