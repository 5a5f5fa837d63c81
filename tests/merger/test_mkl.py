"""merger.mkl: MKL's AVX2 kernels chosen on x86 CPUs that are not Intel's, and only there."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from merger import cpu, mkl
from service import cli

AMD_EPYC = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model name	: AMD EPYC
flags		: fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni vaes

processor	: 1
vendor_id	: AuthenticAMD
flags		: fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni vaes
"""
INTEL_XEON = """processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Processor
flags		: fpu vme sse sse2 ssse3 fma sse4_2 avx f16c avx2 avx512f avx512bw amx_tile
"""
OLD_AMD = AMD_EPYC.replace(" avx2", "")
ARM = """processor	: 0
BogoMIPS	: 50.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32
CPU implementer	: 0x41
"""


@pytest.mark.parametrize(
    ("cpuinfo", "chosen"), [(AMD_EPYC, True), (INTEL_XEON, False), (OLD_AMD, False), (ARM, False), ("", False)]
)
def test_the_avx2_branch_is_chosen_for_an_x86_cpu_intel_did_not_make(tmp_path, cpuinfo, chosen):
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    environ: dict[str, str] = {}
    assert mkl.prefer_avx2_kernels(environ, tmp_path / "cpuinfo") is chosen
    assert environ == ({"MKL_CBWR": "AVX2"} if chosen else {})


def test_a_branch_the_user_chose_is_kept(tmp_path):
    (tmp_path / "cpuinfo").write_text(AMD_EPYC)
    environ = {"MKL_CBWR": "COMPATIBLE"}
    assert not mkl.prefer_avx2_kernels(environ, tmp_path / "cpuinfo")
    assert environ == {"MKL_CBWR": "COMPATIBLE"}


def test_no_cpuinfo_sets_nothing(tmp_path):
    environ: dict[str, str] = {}
    assert not mkl.prefer_avx2_kernels(environ, tmp_path / "absent")
    assert environ == {}


def test_the_d2lora_entry_point_chooses_before_it_parses(tmp_path, monkeypatch):
    (tmp_path / "cpuinfo").write_text(AMD_EPYC)
    monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "cpuinfo")
    monkeypatch.setenv("MKL_CBWR", "")  # recorded as absent, so it is removed again afterwards
    monkeypatch.delenv("MKL_CBWR")
    with pytest.raises(SystemExit):
        cli.main(["merge"])  # a usage error: argparse exits, after the choice
    assert os.environ["MKL_CBWR"] == "AVX2"


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch without oneMKL")
def test_mkl_runs_the_branch_the_entry_point_chose_after_torch_was_imported():
    """This CPU's own answer, from MKL itself (MKL_VERBOSE names the branch of every call it makes)."""
    program = (
        "import torch\nfrom service.cli import main\ntry:\n    main(['merge'])\nexcept SystemExit:\n    pass\n"
        "torch.nn.functional.linear(torch.randn(8, 64), torch.randn(32, 64))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"} | {"MKL_VERBOSE": "1"}
    run = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True)
    calls = [line for line in run.stdout.splitlines() if "SGEMM" in line]
    assert calls, run.stdout
    expected = "CNR:AUTO" if mkl.cpu_wants_avx2_branch() else "CNR:OFF"
    assert all(expected in line for line in calls), calls
