"""LoRAConfig: the scale and the validation of its fields."""

from __future__ import annotations

import pytest

from loralab import LoRAConfig
from loralab.errors import UserError


def test_rslora_scale():
    assert LoRAConfig(rank=16, alpha=32, rslora=True).scale == pytest.approx(8.0)
    assert LoRAConfig(rank=16, alpha=32).scale == pytest.approx(2.0)


@pytest.mark.parametrize("kwargs,needle", [
    ({"rank": 0}, "rank"), ({"rank": -2}, "rank"), ({"alpha": 0}, "alpha"),
    ({"dropout": 1.0}, "dropout"),
])
def test_bad_config_is_a_user_error(kwargs, needle):
    with pytest.raises(UserError, match=needle):
        LoRAConfig(**kwargs)
