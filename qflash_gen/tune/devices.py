"""``qflash-tune --devices 0,1,…``: one device runner per GPU of this host, on the same studies.

The parent measures nothing.  It checks that the GPUs are one model (a study and its DB file are
per GPU model: an H100 SXM and an H100 PCIe are different GPUs here), then starts one
``qflash-tune`` per device (a *device runner*) with the same arguments, pinned to its GPU by ``CUDA_VISIBLE_DEVICES``
(an index is mapped through the parent's own ``CUDA_VISIBLE_DEVICES`` if it has one) and labeled
``cuda:<i>``.  The runners share the studies through the storage: each takes a slot and
spends its own ``--trials`` (:mod:`.study`), leases keep them from measuring a config twice, and the
last one to finish a study writes its DB entry (:mod:`.db_turn`).  Each runner's output is
forwarded with its label in front.  With ``--simulate`` the runners replay the table instead
(labels ``sim:<i>``, no GPU is touched): the several-runner path runs in CI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from qflash_gen import gpu
from qflash_gen.tune.measure.isolation import PACKAGE_ROOT


def parse_devices(text: str) -> list[int]:
    """``"0,1"`` → ``[0, 1]``; ValueError naming ``--devices`` otherwise."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(not p for p in parts):
        raise ValueError(f"--devices {text!r}: give CUDA device indices separated by commas, e.g. 0,1")
    out = []
    for p in parts:
        if not p.isdigit():
            raise ValueError(f"--devices {text!r}: {p!r} is not a device index (0, 1, ...)")
        out.append(int(p))
    dup = sorted({i for i in out if out.count(i) > 1})
    if dup:
        raise ValueError(f"--devices {text!r}: device {dup[0]} is listed twice (one worker per GPU)")
    return out


def check_same_model(models: Sequence[tuple[int, str, str]]) -> str:
    """The one GPU model of ``(index, short name, device name)`` triples; ValueError naming
    ``--devices`` when they differ (a study, and its DB file, is per model)."""
    if not models:
        raise ValueError("--devices: no device given")
    shown = ",".join(str(i) for i, _, _ in models)
    groups: dict[str, list[int]] = {}
    for i, short, _ in models:
        groups.setdefault(short, []).append(i)
    if len(groups) > 1:
        each = ", ".join(f"{i} = {short} ({name})" for i, short, name in models)
        runs = " and ".join(f"--devices {','.join(map(str, ids))}" for ids in groups.values())
        raise ValueError(
            f"--devices {shown}: the GPUs are not all the same model: {each}. A study and its DB file are per "
            f"GPU model, so run one qflash-tune per model: {runs}"
        )
    return next(iter(groups))


def physical_index(index: int, environ: Mapping[str, str] | None = None) -> str:
    """What ``CUDA_VISIBLE_DEVICES`` must say for the worker of ``index`` (an index as this process
    sees the GPUs: through its own ``CUDA_VISIBLE_DEVICES``, if set)."""
    env = os.environ if environ is None else environ
    visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if "CUDA_VISIBLE_DEVICES" in env and 0 <= index < len(visible):
        return visible[index]
    return str(index)


def child_argv(argv: Sequence[str]) -> list[str]:
    """The parent's arguments without ``--devices`` (each device runner gets ``--device-label``)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--devices":
            skip = True
            continue
        if a.startswith("--devices="):
            continue
        out.append(a)
    return out


def _forward(stream: TextIO, label: str, sink: TextIO, lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            sink.write(f"[{label}] {line}" if line.endswith("\n") else f"[{label}] {line}\n")
            sink.flush()


def run_device_runners(
    argv: Sequence[str],
    runners: Sequence[tuple[str, Mapping[str, str]]],
    *,
    err: Any = None,
    sink: TextIO | None = None,
) -> list[int]:
    """Run ``qflash-tune ARGV --device-label LABEL`` once per ``(label, environment)`` at the same
    time; returns their exit statuses.  Ctrl-C stops them all (their finished trials are stored)."""
    sink = sink or sys.stderr
    lock = threading.Lock()
    procs: list[subprocess.Popen[str]] = []
    threads = []
    for label, extra in runners:
        env = {**os.environ, **extra, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-m", "qflash_gen.tune.cli", *argv, "--device-label", label],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            bufsize=1,
        )
        procs.append(proc)
        t = threading.Thread(target=_forward, args=(proc.stdout, label, sink, lock), daemon=True)
        t.start()
        threads.append(t)
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        raise
    for t in threads:
        t.join(timeout=10)
    return codes


# -- the GPUs of this host ----------------------------------------------------------------------------
def present_gpu() -> tuple[str | None, str]:
    """``(short name, description)`` of the CUDA device present, or ``(None, why not)``."""
    import torch

    if not torch.cuda.is_available():
        return None, "no CUDA GPU is present (torch.cuda.is_available() is False)"
    name = gpu.current_gpu()
    return name, f"{name} ({torch.cuda.get_device_name()})"



def device_models(indices: Sequence[int]) -> list[tuple[int, str, str]]:
    """``(index, short name, device name)`` of the CUDA devices ``indices`` (``--devices``);
    ValueError naming ``--devices`` when there is no GPU or an index does not exist."""
    import torch

    shown = ",".join(map(str, indices))
    if not torch.cuda.is_available():
        raise ValueError(
            f"--devices {shown}: no CUDA GPU is present (torch.cuda.is_available() is False); "
            "without a GPU, replay a recorded table: --simulate FILE --devices 0,1"
        )
    count = torch.cuda.device_count()
    out = []
    for i in indices:
        if not 0 <= i < count:
            raise ValueError(f"--devices {shown}: CUDA device {i} does not exist ({count} visible: 0..{count - 1})")
        props = torch.cuda.get_device_properties(i)
        short = gpu.normalize_gpu_name(props.name, (props.major, props.minor), int(props.total_memory))
        out.append((i, short, props.name))
    return out


