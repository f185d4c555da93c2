"""NVML's total-energy counter, the one source of energy numbers (see :mod:`qflash_gen.energy`).

Where there is no counter (no pynvml, no NVIDIA driver, a GPU without the energy counter) every
entry point raises :class:`EnergyUnavailable` with the reason: no energy number is ever estimated.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, runtime_checkable

UNAVAILABLE = "NVML energy counter unavailable"


class EnergyUnavailable(RuntimeError):
    """No energy counter here (no pynvml, no driver, no GPU, or a GPU without the counter)."""


class EnergyError(RuntimeError):
    """A measurement that cannot meet its own rules (loop too short, counter not advancing)."""


# -- the counter -----------------------------------------------------------------------------------
@runtime_checkable
class EnergyCounter(Protocol):
    """A monotonic energy counter in millijoules (NVML's, or a fake in tests)."""

    description: str

    def read_mj(self) -> int: ...


class NVMLCounter:
    """``nvmlDeviceGetTotalEnergyConsumption`` of one GPU.  Open it with :func:`open_counter`."""

    def __init__(self, nvml: Any, handle: Any, description: str) -> None:
        self._nvml = nvml
        self._handle = handle
        self.description = description

    def read_mj(self) -> int:
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutting down a library that may already be gone
            pass


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def torch_identity(device: int | None) -> tuple[str | None, str | None, str]:
    """``(NVML uuid, PCI bus id, torch device name)`` of a CUDA device as torch sees it (NVML
    ignores ``CUDA_VISIBLE_DEVICES``, so the device is matched by UUID or PCI address)."""
    try:
        import torch
    except ImportError:
        return None, None, ""
    if not torch.cuda.is_available():
        return None, None, ""
    index = torch.cuda.current_device() if device is None else device
    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    uuid_s = None
    if uuid is not None:
        uuid_s = str(uuid)
        if not uuid_s.startswith("GPU-"):
            uuid_s = "GPU-" + uuid_s
    pci = None
    if all(hasattr(props, a) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
        pci = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    return uuid_s, pci, props.name


def import_nvml() -> Any:
    try:
        import pynvml
    except ImportError as exc:
        raise EnergyUnavailable(
            f"{UNAVAILABLE}: the Python module pynvml is not installed ({exc}); install nvidia-ml-py "
            "(pip install nvidia-ml-py) on a machine with an NVIDIA driver. No energy is measured or estimated."
        ) from None
    return pynvml


def open_counter(device: int | None = None, *, nvml: Any = None) -> NVMLCounter:
    """NVML's energy counter of the CUDA device ``device`` (default: the current one).

    Raises :class:`EnergyUnavailable` naming the reason: pynvml missing, NVML not starting (no
    driver), the GPU not found, or the GPU not supporting the counter."""
    nvml = nvml if nvml is not None else import_nvml()
    try:
        nvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - pynvml.NVMLError and its many subclasses
        raise EnergyUnavailable(
            f"{UNAVAILABLE}: NVML could not start ({type(exc).__name__}: {exc}); is there an NVIDIA GPU "
            "and driver on this machine? No energy is measured or estimated."
        ) from None
    uuid, pci, torch_name = torch_identity(device)
    handle, how, errors = None, "", []
    for kind, key, fn in (
        ("uuid", uuid, getattr(nvml, "nvmlDeviceGetHandleByUUID", None)),
        ("pci", pci, getattr(nvml, "nvmlDeviceGetHandleByPciBusId", None)),
    ):
        if key is None or fn is None:
            continue
        try:
            handle, how = fn(key), f"{kind} {key}"
            break
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{kind} {key}: {exc}")
    if handle is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        index = device or 0
        if visible not in (None, "") and (uuid or pci):
            _shutdown(nvml)
            raise EnergyUnavailable(
                f"{UNAVAILABLE}: CUDA device {index} ({torch_name}) not found by NVML ({'; '.join(errors)})"
            )
        try:
            handle, how = nvml.nvmlDeviceGetHandleByIndex(index), f"index {index}"
        except Exception as exc:  # noqa: BLE001
            _shutdown(nvml)
            raise EnergyUnavailable(f"{UNAVAILABLE}: no NVIDIA GPU {index} visible to NVML ({exc})") from None
    try:
        name = _text(nvml.nvmlDeviceGetName(handle))
    except Exception:  # noqa: BLE001
        name = torch_name or "unknown GPU"
    try:
        nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception as exc:  # noqa: BLE001 - NVMLError_NotSupported on older or some boards
        _shutdown(nvml)
        raise EnergyUnavailable(
            f"{UNAVAILABLE} on {name}: nvmlDeviceGetTotalEnergyConsumption failed ({type(exc).__name__}: {exc}); "
            "the counter needs a Volta or newer GPU that reports it. No energy is measured or estimated."
        ) from None
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
    except Exception:  # noqa: BLE001
        driver = "?"
    return NVMLCounter(nvml, handle, f"NVML total energy, {name} ({how}), driver {driver}")


def _shutdown(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception:  # noqa: BLE001
        pass


def probe(device: int | None = None) -> str:
    """The counter's description if energy can be measured here; :class:`EnergyUnavailable` if not."""
    counter = open_counter(device)
    try:
        counter.read_mj()
        return counter.description
    finally:
        counter.close()
