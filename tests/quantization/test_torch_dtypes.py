"""Formats named by torch dtypes: every code decodes as torch itself decodes those bits."""

import numpy as np
import pytest
import torch

from altgrad.quantization.formats import TORCH_DTYPE_FORMATS, get_format
from references import same_values


@pytest.mark.parametrize("dtype", list(TORCH_DTYPE_FORMATS), ids=str)
def test_every_code_decodes_as_torch_decodes_it(dtype):
    fmt = get_format(dtype)
    assert get_format(str(dtype)) is fmt  # "torch.float8_e4m3fn" names the same format
    bits = np.arange(fmt.num_codes, dtype=np.uint8 if fmt.total_bits <= 8 else np.uint16)
    as_int = torch.from_numpy(bits.view(np.int8 if fmt.total_bits <= 8 else np.int16))
    expected = as_int.view(dtype).to(torch.float64).numpy()
    assert same_values(fmt.values().numpy(), expected).all()


def test_the_expected_dtypes_are_there():
    names = {str(dtype) for dtype in TORCH_DTYPE_FORMATS}
    assert {"torch.float8_e4m3fn", "torch.float8_e5m2", "torch.bfloat16", "torch.float16"} <= names
    if hasattr(torch, "float8_e4m3fnuz"):
        assert {"torch.float8_e4m3fnuz", "torch.float8_e5m2fnuz"} <= names


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_dtypes_without_a_format_are_a_clear_error(dtype):
    with pytest.raises(ValueError, match=rf"{dtype} has no altgrad format .*'none'"):
        get_format(dtype)
