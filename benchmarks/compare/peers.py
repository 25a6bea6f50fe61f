"""The registry of implementations the comparison knows: one small module per peer, imported on demand.

Every peer module provides

``NAME``
    Its name in tables and JSON.
``TASKS``
    The tasks it can run, among :data:`~.runner.TASKS`.
``missing(device) -> str or None``
    Why it cannot run on ``device`` (``"cpu"`` or ``"gpu"``), or ``None`` if it can.
    Must not raise, and should be cheap.
``prepare(task, shape, inputs, device) -> Runner``
    Builds everything the timed call needs, for a task in ``TASKS`` on a device
    where ``missing`` found nothing; raises :class:`~.runner.PeerUnavailable` for
    a geometry it does not support.

Callers go through :func:`prepare_runner`, which checks the first two.
Importing this module imports none of the peers' libraries.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .runner import PeerUnavailable, Runner

__all__ = ["PEER_MODULES", "REFERENCE", "peer_module", "prepare_runner"]

# deformcp itself is listed first: every other peer's outputs are compared with its.
REFERENCE = "deformcp"
PEER_MODULES = {
    "deformcp": "deformcp_peer",
    "onnxruntime": "onnxruntime_peer",
    "openvino": "openvino_peer",
    "torchvision": "torchvision_peer",
    "grid_sample": "grid_sample_peer",
}


def peer_module(name: str) -> ModuleType:
    """The module of the peer called ``name``.

    Raises
    ------
    KeyError
        If no peer has that name; the message lists the names.
    """
    try:
        module = PEER_MODULES[name]
    except KeyError:
        raise KeyError(f"unknown peer {name!r}; known: {', '.join(PEER_MODULES)}") from None
    return importlib.import_module(f"{__package__}.{module}")


def prepare_runner(name: str, task: str, shape, inputs, device: str) -> Runner:
    """The peer called ``name``, prepared for ``task`` on ``shape`` and ``inputs`` on ``device``.

    Raises
    ------
    PeerUnavailable
        If the peer's library or device is missing, it does not run ``task``, or it
        does not support the geometry; the message says which.
    """
    module = peer_module(name)
    reason = module.missing(device)
    if reason:
        raise PeerUnavailable(reason)
    if task not in module.TASKS:
        raise PeerUnavailable(f"{name} does not run {task} (only {', '.join(module.TASKS)})")
    return module.prepare(task, shape, inputs, device)
