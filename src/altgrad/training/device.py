"""``train.device``: where a run trains. ``auto`` (the default) is the current CUDA device when CUDA
is available, else the CPU; ``cuda`` is the current CUDA device (an error without one); ``cuda:N``
is GPU N; ``cpu`` the CPU. The current CUDA device is ``cuda:0`` unless the process chose another:
the matrix runner's ``--jobs`` worker k makes it ``cuda:(k mod GPUs)``.

Example::

    >>> resolve_device("cpu")
    device(type='cpu')
"""

from __future__ import annotations

import torch


def resolve_device(setting: str) -> torch.device:
    """The torch device for a ``train.device`` value (``auto``, ``cpu``, ``cuda``, ``cuda:N``)."""
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(setting.split(":")[1]) if ":" in setting else torch.cuda.current_device() if count else 0
    if index >= count:
        raise ValueError(f"train.device is {setting!r} but this machine has {count} CUDA device(s)")
    return torch.device("cuda", index)
