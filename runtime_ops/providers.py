"""Execution providers: a ``--device`` name turned into an ORT providers list, and the check
that an ORT session runs on the providers it was asked for."""

from __future__ import annotations

import re

from torq_onnx.errors import TorqError


def device_providers(device: str) -> list:
    """The ORT ``providers`` for a device name: ``cpu``, ``cuda`` (the CUDA EP on GPU 0) or
    ``cuda:N`` (on GPU N)."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if m is None:
        raise TorqError(f"--device must be cpu, cuda or cuda:N (a GPU's index), got {device!r}")
    return ["CUDAExecutionProvider"] if m.group(1) is None else [("CUDAExecutionProvider", {"device_id": m.group(1)})]


def provider_names(providers: list) -> list[str]:
    """The names in an ORT ``providers`` list of names and (name, options) pairs."""
    return [p[0] if isinstance(p, tuple) else p for p in providers]


def require_installed(requested: list, what: str) -> None:
    """Raise :func:`require_providers`'s error before a session is made (so before ORT loads
    the model and warns) where a requested provider is not in this onnxruntime at all."""
    import onnxruntime as ort

    _refuse([n for n in provider_names(requested) if n not in ort.get_available_providers()], None, what)


def require_providers(session, requested: list, what: str) -> None:
    """Raise a TorqError naming the requested providers ``session`` did not enable.

    ORT falls back to the CPU, with only a warning, when a provider is not installed or its
    libraries (CUDA, cuDNN) fail to load: a run asked for on the GPU must not quietly take
    the CPU. ``requested``: provider names or (name, options) pairs; ``what``: the model."""
    enabled = session.get_providers()
    _refuse([n for n in provider_names(requested) if n not in enabled], enabled, what)


def _refuse(missing: list[str], enabled: list[str] | None, what: str) -> None:
    """The error for ``missing`` providers; ``enabled``: the session's, None before a session."""
    import onnxruntime as ort

    if not missing:
        return
    installed, names = ", ".join(ort.get_available_providers()), ", ".join(missing)
    if enabled is None:
        problem = f"this onnxruntime has no {names}, asked for {what} (installed: {installed})"
    else:
        problem = f"ONNX Runtime did not enable {names} for {what} (enabled: {', '.join(enabled)}; installed: {installed})"
    raise TorqError(f"{problem}. For CUDA: onnxruntime-gpu in place of onnxruntime, and CUDA 13's runtime, cuBLAS and "
                    "cuDNN libraries where the loader finds them")
