"""Whether the installed torch, torchvision and torch_npu belong together, told before anything
imports them.

A torchvision built for another torch fails at its import, deep inside imgtrain and after Hydra
has made the run folder (`RuntimeError: operator torchvision::nms does not exist`: its C++
operators did not load, and registering their Python side finds nothing). run.py asks here first.
The versions come from each package's own `version.py`, which its build writes with the build's
variant (`2.13.0+cpu`, `0.28.0+cu128`), read as text: nothing is imported. Where a package has no
such file, its installed metadata says the version.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path

# The pair imgtrain is tested with: pyproject.toml's upper bounds.
TESTED_TORCH, TESTED_TORCHVISION = "2.14", "0.29"
# torchvision's own compatibility table (its README): 0.N is released with torch 2.(N - 15) since
# 0.15 with 2.0, and with torch 1.(N - 1) before.
TORCHVISION_FOR_TORCH = {2: 15, 1: 1}
WHEEL_INDEX = "https://download.pytorch.org/whl/"
_VERSION_LINE = re.compile(r"^__version__\s*(?::\s*str\s*)?=\s*['\"]([^'\"]+)['\"]", re.MULTILINE)
_RELEASE = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?")
_WHEEL_VARIANT = re.compile(r"^(cpu|cu\d{2,}|rocm[\d.]+|xpu)$")


def installed_version(package: str) -> str | None:
    """`package`'s version as its build wrote it, or None where it is not installed."""
    try:
        spec = importlib.util.find_spec(package)  # finds the package; does not import it
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return None
    if spec.origin:
        try:
            found = _VERSION_LINE.search((Path(spec.origin).parent / "version.py").read_text())
        except OSError:
            found = None
        if found:
            return found.group(1)
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version such as 2.13.0+cpu, 2.15.0a0+git1234 or 2.1.0.post3."""
    found = _RELEASE.match(version)
    if found is None:
        return ()
    return tuple(int(part) for part in found.groups() if part is not None)


def _variant(version: str) -> str:
    """The wheel's variant, from the local part: cpu, cu128, rocm6.2, xpu, or '' (not said, or a
    source build's +git<hash>)."""
    local = version.partition("+")[2].lower()
    return local if _WHEEL_VARIANT.match(local) else ""


def _family(variant: str) -> str:
    return re.sub(r"[\d.]+$", "", variant)  # cu128 -> cu, rocm6.2 -> rocm


def paired_torchvision(torch_version: str) -> str | None:
    """The torchvision release (0.N) made for `torch_version`'s minor release, where known."""
    release = _release(torch_version)
    if len(release) < 2 or release[0] not in TORCHVISION_FOR_TORCH:
        return None
    return f"0.{release[1] + TORCHVISION_FOR_TORCH[release[0]]}"


def _build_mismatch(torch_variant: str, vision_variant: str) -> str | None:
    """Why torchvision's build cannot load into torch's: an accelerator build of torchvision
    links that accelerator's torch libraries, which another build of torch lacks; and
    torchvision's own check refuses CUDA builds of two major versions."""
    vision_family = _family(vision_variant)
    if not torch_variant or vision_family in ("", "cpu"):
        return None
    if vision_family != _family(torch_variant):
        return f"torchvision is a {vision_variant} build and torch a {torch_variant} build"
    cuda_major = {variant: variant[2:-1] for variant in (torch_variant, vision_variant)}
    if vision_family == "cu" and cuda_major[vision_variant] != cuda_major[torch_variant]:
        return (f"torchvision is built for CUDA {cuda_major[vision_variant]}, torch for CUDA "
                f"{cuda_major[torch_variant]}")
    return None


def _install_line(torch_version: str) -> str:
    """The torchvision made for the installed torch, from the wheel index of torch's own build
    where its version says which (a CPU torch needs the CPU torchvision)."""
    variant = _variant(torch_version)
    index = f" --index-url {WHEEL_INDEX}{variant}" if variant else ""
    wanted = paired_torchvision(torch_version)
    tested = f"imgtrain is tested with torch {TESTED_TORCH} and torchvision {TESTED_TORCHVISION}"
    if wanted is None:
        return (f"install the pair imgtrain is tested with: pip install 'torch=={TESTED_TORCH}.*' "
                f"'torchvision=={TESTED_TORCHVISION}.*'{index}")
    return (f"install torchvision {wanted} beside torch {torch_version}: pip install "
            f"'torchvision=={wanted}.*'{index} ({tested})")


def torchvision_mismatch(torch_version: str, vision_version: str) -> str | None:
    """Why `vision_version` of torchvision does not belong with `torch_version`, or None."""
    wanted = paired_torchvision(torch_version)
    vision = _release(vision_version)
    if wanted is not None and len(vision) >= 2 and f"{vision[0]}.{vision[1]}" != wanted:
        torch_release = _release(torch_version)
        why = (f"torch {torch_release[0]}.{torch_release[1]}'s torchvision is {wanted}, not "
               f"{vision[0]}.{vision[1]}")
    else:
        why = _build_mismatch(_variant(torch_version), _variant(vision_version))
    if why is None:
        return None
    return (f"torch {torch_version} and torchvision {vision_version} do not belong together "
            f"({why}); {_install_line(torch_version)}")


def npu_mismatch(torch_version: str, npu_version: str) -> str | None:
    """torch_npu is released for one torch release (X.Y.Z; .postN and rcN are its own fixes)."""
    wanted = ".".join(map(str, _release(torch_version)[:3]))
    if ".".join(map(str, _release(npu_version)[:3])) == wanted:
        return None
    return (f"torch {torch_version} and torch_npu {npu_version} do not belong together "
            f"(each torch_npu is built for one torch release); install torch_npu {wanted} beside "
            f"torch {torch_version}: pip install 'torch-npu=={wanted}.*', with the CANN its "
            "release lists (docs/precision-and-npu.md)")


def mismatch() -> str | None:
    """Why the installed torch, torchvision and torch_npu do not belong together, or None."""
    torch_version = installed_version("torch")
    if torch_version is None:
        return None  # pip's own message about the dependency is clearer than any here
    vision_version = installed_version("torchvision")
    if vision_version is None:
        return (f"torch {torch_version} is installed without torchvision; "
                f"{_install_line(torch_version)}")
    problem = torchvision_mismatch(torch_version, vision_version)
    npu_version = installed_version("torch_npu")
    if problem is None and npu_version is not None:
        problem = npu_mismatch(torch_version, npu_version)
    return problem
