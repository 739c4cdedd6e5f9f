"""What the speed layer decides from the CPU's flags, for the CPUs this project has met (Intel Sapphire
Rapids: AVX-512 and AMX; AMD EPYC: AVX-512 and AVX512-BF16, no AMX; an AVX2 machine), each with and
without the flags ``MLX_PERSONA_CPU_FLAGS_MASK`` hides; and that the mask reaches what is really loaded
and built on this machine (the OpenBLAS kernels, the compiler's view of the CPU, doctor)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from mlx_persona.backend import cpu, sgemm
from mlx_persona.backend.blas import openblas_coretype
from mlx_persona.backend.cpu import MASK_ENV, hidden_flags, march_flags


def _flags(text: str) -> frozenset[str]:
    return frozenset(text.split())


BASE = _flags("fpu tsc cx8 cmov mmx fxsr sse sse2 ssse3 sse4_1 sse4_2 popcnt pclmulqdq aes xsave")
AVX2 = BASE | _flags("avx f16c fma bmi1 bmi2 avx2 movbe")
AVX512 = _flags("avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl avx512vbmi avx512_vbmi2 avx512_vnni "
                "avx512_bitalg avx512_vpopcntdq")
CPUS = {  # /proc/cpuinfo flags, the ones the speed layer looks at and their neighbours
    "sapphire-rapids": AVX2 | AVX512 | _flags("avx_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8 "
                                              "sha_ni gfni vaes serialize"),
    "epyc": AVX2 | AVX512 | _flags("avx_vnni avx512_bf16 sha_ni gfni vaes clzero"),
    "haswell": AVX2,
    "sse-only": BASE,
}
NO_AVX512 = ("-mno-avx512f", "-mno-avx512bw", "-mno-avx512vl")
NO_AMX = ("-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8")

# (cpu, mask) -> OpenBLAS kernels, what bf16 products run on, switches built code must get / must not get
DECISIONS = [
    ("sapphire-rapids", "", "SkylakeX", "AMX", (), NO_AVX512 + NO_AMX),
    ("sapphire-rapids", "amx*", "SkylakeX", "AVX512-BF16", NO_AMX, NO_AVX512 + ("-mno-avx512bf16",)),
    ("sapphire-rapids", "amx_tile avx512_bf16", "SkylakeX", "", NO_AMX + ("-mno-avx512bf16",), NO_AVX512),
    ("sapphire-rapids", "avx512*", "Haswell", "AMX", NO_AVX512 + ("-mno-avx512bf16",), NO_AMX),
    ("epyc", "", "SkylakeX", "AVX512-BF16", (), NO_AVX512 + ("-mno-avx512bf16",)),
    ("epyc", "avx512_bf16", "SkylakeX", "", ("-mno-avx512bf16",), NO_AVX512),
    ("epyc", "avx512f", "Haswell", "", NO_AVX512 + ("-mno-avx512bf16",), ()),  # the rest of AVX-512 with it
    ("epyc", "AVX512*, amx*", "Haswell", "", NO_AVX512, NO_AMX),  # case, commas: as written in a shell
    ("haswell", "", "Haswell", "", (), NO_AVX512),
    ("haswell", "fma", None, "", ("-mno-fma",), ("-mno-avx2",)),  # OpenBLAS left to detect
    ("haswell", "avx", None, "", ("-mno-avx", "-mno-avx2", "-mno-fma", "-mno-f16c"), ()),
    ("sse-only", "", None, "", (), ()),
]


@pytest.mark.parametrize("name, mask, core, bf16, switches, not_switches", DECISIONS)
def test_each_cpu_with_and_without_masked_flags_gets_its_paths(name, mask, core, bf16, switches, not_switches):
    host = CPUS[name]
    hidden = hidden_flags(host, mask)
    seen = host - hidden
    assert hidden <= host  # a mask only takes away
    assert openblas_coretype(seen) == core
    assert sgemm.cpu_support(seen) == bf16
    flags = march_flags(hidden)
    assert flags[0] == "-march=native"
    assert set(switches) <= set(flags) and not set(not_switches) & set(flags), flags


def test_a_mask_cannot_add_a_flag_nor_read_a_file():
    host = CPUS["epyc"]
    assert hidden_flags(host, "amx_tile amx_bf16") == frozenset()  # the EPYC has no AMX: still none
    assert hidden_flags(host, "") == hidden_flags(host, " , ") == frozenset()
    assert hidden_flags(host, "/etc/passwd,../x") == frozenset()  # not a flag name: ignored, with a warning
    assert march_flags(frozenset()) == ("-march=native",)
    assert march_flags(frozenset({"sha_ni"})) == ("-march=native",)  # hidden from our choices, no switch


def test_the_mask_is_honoured_on_this_machine(monkeypatch):
    host = cpu.host_cpu_flags()
    monkeypatch.delenv(MASK_ENV, raising=False)
    assert cpu.cpu_flags() == host
    monkeypatch.setenv(MASK_ENV, "avx512*,amx*")
    assert cpu.cpu_flags() == {f for f in host if not f.startswith(("avx512", "amx"))}
    assert cpu.host_cpu_flags() == host
    if "avx512f" in host:
        assert "hidden by MLX_PERSONA_CPU_FLAGS_MASK: " in cpu.describe_flags() and "AVX-512" not in cpu.describe_flags()


def _compiler_defines(*flags: str) -> set[str]:
    out = subprocess.run([shutil.which("gcc"), *flags, "-dM", "-E", "-x", "c", os.devnull], check=True,
                         capture_output=True, text=True).stdout
    return {line.split()[1] for line in out.splitlines() if line.startswith("#define")}


@pytest.mark.skipif(shutil.which("gcc") is None or sys.platform != "linux", reason="needs gcc on Linux")
def test_code_built_under_a_mask_does_not_use_the_hidden_instructions():
    """sgemm.c converts to bf16 with AVX512-BF16 instructions only where ``__AVX512BF16__`` is defined; the
    JIT's kernels use AVX-512 only where ``__AVX512F__`` is. Masked, the compiler sees neither."""
    host = cpu.host_cpu_flags()
    native = _compiler_defines(*march_flags(frozenset()))
    assert ("__AVX512BF16__" in native) == ("avx512_bf16" in host)
    assert ("__AVX512F__" in native) == ("avx512f" in host)
    no_bf16 = _compiler_defines(*march_flags(hidden_flags(host, "avx512_bf16")))
    assert "__AVX512BF16__" not in no_bf16 and ("__AVX512F__" in no_bf16) == ("avx512f" in host)
    no_avx512 = _compiler_defines(*march_flags(hidden_flags(host, "avx512*")))
    assert not {d for d in no_avx512 if d.startswith("__AVX512")}
    assert ("__AVX2__" in no_avx512) == ("avx2" in host)


@pytest.mark.skipif(sys.platform != "linux", reason="the speed layer is for Linux")
def test_doctor_reports_the_masked_view(tmp_path):
    """A fresh process under the mask: OpenBLAS gets the AVX2 kernels, MLX's kernels are built without
    AVX-512, and doctor says what was hidden."""
    host = cpu.host_cpu_flags()
    if not {"avx512f", "avx2", "fma"} <= host:
        pytest.skip("needs a CPU with AVX-512 to hide it")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}  # setup() chooses
    env.update({MASK_ENV: "avx512*", "MLX_PERSONA_CACHE": str(tmp_path / "cache")})
    proc = subprocess.run([sys.executable, "-m", "mlx_persona", "doctor", "--size", "64"], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in proc.stdout.splitlines())}
    assert lines["cpu"].startswith("AVX2 FMA (hidden by MLX_PERSONA_CPU_FLAGS_MASK: "), lines["cpu"]
    assert "avx512f" in lines["cpu"] and "AVX-512" not in lines["cpu"]
    if lines["blas_note"] == "loaded":
        assert lines["blas_core"] == "Haswell", proc.stdout
    if lines["jit"].startswith("g++ "):
        assert "-march=native -mno-" in lines["jit"] and "-mno-avx512f" in lines["jit"], lines["jit"]
