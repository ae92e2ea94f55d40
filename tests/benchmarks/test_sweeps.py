"""Sweep presets and groups, the plots, the tier table and the ncu summary, on CPU at tiny
sizes (no timing is asserted)."""

import json

import pytest

from benchmarks import __main__ as cli
from benchmarks import plots, presets, problems, profile, report, runner
from jax_sparsek.testing import PRESETS as BASE
from jax_sparsek.testing import AttentionSpec

ENV = {"device": "Test GPU", "jax": "0", "date": "2026-01-01", "commit": None}


def test_presets_and_groups_resolve():
    assert presets.resolve(["long"]) == ["long8k", "long16k", "long32k", "long64k", "long128k"]
    assert presets.resolve(["decode"]) == ["decode32k", "decode128k", "sparsek-decode32k",
                                           "sparsek-decode128k"]
    assert presets.resolve(["density"])[0] == "bsdensity05" and presets.GROUPS["density"][-1] == "bsdensity100"
    assert len(presets.resolve(["sparsek-sweep"])) == 2 * 5 * 3
    # Groups and names mix, each preset once, in order; "all" is BENCHMARKS.md's presets.
    assert presets.resolve(["seed000", "all"]) == list(BASE)
    assert presets.PRESETS["long32k"] == BASE["long32k"]
    assert presets.PRESETS["bsdensity20"] == BASE["blocksparse80"]
    assert presets.PRESETS["sparsek-seed003-k256-w256"] == BASE["sparsek-seed003"]
    dec = presets.PRESETS["decode128k"]
    assert (dec.B, dec.T, dec.s, dec.N, dec.k, dec.D, dec.dtype) == (8, 1, 131072, 32, 8, 128, "bfloat16")
    assert problems.scale_down(dec, 16).T == 1  # a decoding step stays one query
    args = cli.parse_args(["--preset", "decode", "long8k"])
    assert args.preset == ["decode32k", "decode128k", "sparsek-decode32k", "sparsek-decode128k",
                           "long8k"]
    with pytest.raises(SystemExit):
        cli.parse_args(["--preset", "bsdensity15"])


def test_tiny_sweep_writes_records_and_plots(tmp_path, capsys):
    argv = ["--preset", "long8k", "bsdensity40", "sparsek-seed003-k128-w128", "--scale-down", "64",
            "--dtype", "fp32", "--passes", "fwd", "--iters", "2", "--impl", "jax_sparsek",
            "jax.nn[xla]", "--out", str(tmp_path), "--plots"]
    records = cli.main(argv)
    names = {"long8k-dtypefp32-div64", "bsdensity40-dtypefp32-div64",
             "sparsek-seed003-k128-w128-dtypefp32-div64"}
    assert {r["preset"] for r in records} == names
    assert {r["impl"] for r in records} == {"jax_sparsek", "jax.nn[xla]"}
    assert all(tuple(r) == runner.FIELDS for r in records)
    assert {p.name for p in tmp_path.glob("cpu/*.json")} == {f"{records[0]['date']}-{n}.json" for n in names}
    out = capsys.readouterr().out
    assert "tier <= 3.82" in out
    assert {p.name for p in tmp_path.glob("cpu/plots/*.png")} == {
        "throughput.png", "speedup_density.png", "speedup_kselect.png"}


def _rec(preset, impl, ms, spec, op=None):
    r = runner.record(preset, problems.Target(spec), impl, "fwd", ms, 1e-3, ENV)
    return dict(r, op=op or r["op"])


def test_plots_from_synthetic_records(tmp_path, capsys):
    device = tmp_path / "test-gpu"
    device.mkdir()
    recs = []
    for n in (8, 16, 32):
        spec = presets.PRESETS[f"long{n}k"]
        recs += [_rec(f"long{n}k", "jax_sparsek", n * 0.2, spec), _rec(f"long{n}k", "jax.nn[cudnn]", n * 0.25, spec)]
    for p in (5, 20, 100):
        spec = presets.PRESETS[f"bsdensity{p:02d}"]
        recs += [_rec(f"bsdensity{p:02d}", "jax_sparsek", p * 0.1, spec),
                 _rec(f"bsdensity{p:02d}", "jax.nn[cudnn]", 10.0, spec, op="flash_attention"),
                 _rec(f"bsdensity{p:02d}", "jax_sparsek[xla]", 1.0, spec)]  # not a dense peer
    (device / "2026-01-01-sweep.json").write_text(json.dumps(recs))
    assert plots.speedups(recs, plots.DENSITY) == pytest.approx(
        {"bsdensity05": 20.0, "bsdensity20": 5.0, "bsdensity100": 1.0})
    written = plots.write_plots(device)
    assert [p.name for p in written] == ["throughput.png", "speedup_density.png"]
    assert all(p.stat().st_size > 1000 for p in written)
    assert "skip speedup_kselect" in capsys.readouterr().out


def test_tier_table_verdicts_and_floors():
    spec = AttentionSpec(B=16, T=512, N=96, D=64, dtype="float16")  # seed000
    recs = [_rec("seed000", "jax_sparsek", us * 96 / 1e3, spec) for us in (3.82, 2.5, 1.5, 4.0)]
    recs.append(_rec("seed000", "jax.nn[cudnn]", 0.3, spec))  # peers have no tier row
    rows = report.tier_rows(recs)
    assert [r[5:] for r in rows] == [("pass", "fail", "fail"), ("pass", "pass", "fail"),
                                      ("pass", "pass", "pass"), ("fail", "fail", "fail")]
    # Floors: q, k, v, o once at 2.97 TB/s and 4*B*N*T*S*D FLOPs at 795 TF/s, over 96 heads.
    bytes_ = 4 * 16 * 512 * 96 * 64 * 2
    flops = 4 * 16 * 96 * 512 * 512 * 64
    for r in rows:
        assert r[3] == pytest.approx(1e6 * bytes_ / 2.97e12 / 96)
        assert r[4] == pytest.approx(1e6 * flops / 795e12 / 96)
    md = report.tier_markdown(recs).splitlines()
    assert len(md) == 2 + 4 and md[2].startswith("| Test GPU | seed000 | 3.82 | 1.41 | 1.35 | pass |")
    assert report.tier_table([]) == ""


def test_readme_holds_both_tables(tmp_path):
    spec = AttentionSpec(B=16, T=512, N=96, D=64, dtype="float16")
    (tmp_path / "test-gpu").mkdir()
    decode = presets.PRESETS["decode32k"]
    recs = [_rec("seed000", "jax_sparsek", 0.3, spec), _rec("decode32k", "jax_sparsek", 0.5, decode),
            _rec("decode32k", "jax.nn[cudnn]", 0.4, decode)]
    (tmp_path / "test-gpu" / "x.json").write_text(json.dumps(recs))
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- results:begin -->\nold\n<!-- results:end -->\nb\n")
    report.update_readme(readme, tmp_path)
    text = readme.read_text()
    assert "old" not in text and "| ours / best peer |" in text and "| tier < 2.0 |" in text
    # Decoding: 8 x 32768 x 8 x 128 x 2 (k and v) bf16 rows, q and o, in 0.5 ms.
    gbps = (2 * 8 * 32768 * 8 * 128 * 2 + 2 * 8 * 32 * 128 * 2) / 0.5e6
    assert f"| Test GPU | decode32k | jax_sparsek | 500.0 | {gbps:.0f} | {gbps / 2970:.0%} | 1.25 |" in text
    assert "more records" not in text  # every preset is in a table
    assert text.startswith("a\n") and text.endswith("<!-- results:end -->\nb\n")


# `ncu --csv --page details` output as Nsight Compute 2024/2025 prints it: the program's own
# output and ==PROF== lines first, then one row per (launch, metric); values group thousands.
NCU_SAMPLE = '''==PROF== Connected to process 4242 (/usr/bin/python3.12)
==PROF== Profiling "flash_fwd_kernel" - 0: 0%....50%....100% - 9 passes
==PROF== Profiling "flash_fwd_kernel" - 1: 0%....50%....100% - 9 passes
==PROF== Profiling "lse_fixup" - 2: 0%....50%....100% - 9 passes
==PROF== Disconnected from process 4242
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","4242","python3.12","127.0.0.1","flash_fwd_kernel","1","13","(384, 1, 1)","(132, 1, 1)","0","9.0","GPU Speed Of Light Throughput","DRAM Frequency","Ghz","2.62"
"0","4242","python3.12","127.0.0.1","flash_fwd_kernel","1","13","(384, 1, 1)","(132, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Elapsed Cycles","cycle","22,731,104"
"0","4242","python3.12","127.0.0.1","flash_fwd_kernel","1","13","(384, 1, 1)","(132, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Memory Throughput","%","31.20"
"0","4242","python3.12","127.0.0.1","flash_fwd_kernel","1","13","(384, 1, 1)","(132, 1, 1)","0","9.0","GPU Speed Of Light Throughput","DRAM Throughput","%","8.41"
"0","4242","python3.12","127.0.0.1","flash_fwd_kernel","1","13","(384, 1, 1)","(132, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","msecond","13.71"
"0","4242","python3.12","127.0.0.1","flash_fwd_kernel","1","13","(384, 1, 1)","(132, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Compute (SM) Throughput","%","78.35"
"0","4242","python3.12","127.0.0.1","flash_fwd_kernel","1","13","(384, 1, 1)","(132, 1, 1)","0","9.0","Launch Statistics","Registers Per Thread","register/thread","168"
"1","4242","python3.12","127.0.0.1","flash_fwd_kernel","1","13","(384, 1, 1)","(132, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Memory Throughput","%","31.05"
"1","4242","python3.12","127.0.0.1","flash_fwd_kernel","1","13","(384, 1, 1)","(132, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","msecond","13.69"
"1","4242","python3.12","127.0.0.1","flash_fwd_kernel","1","13","(384, 1, 1)","(132, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Compute (SM) Throughput","%","78.40"
"2","4242","python3.12","127.0.0.1","lse_fixup","1","13","(256, 1, 1)","(1,536, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","usecond","1,250.50"
"2","4242","python3.12","127.0.0.1","lse_fixup","1","13","(256, 1, 1)","(1,536, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Memory Throughput","%","64.10"
'''


def test_ncu_command_and_summary():
    cmd = profile.command("seed003", 2, ncu="/opt/ncu", python="/py")
    assert cmd[:8] == ["/opt/ncu", "--clock-control", "none", "--set", "basic", "--csv", "--page", "details"]
    assert cmd[8:14] == ["--kernel-name-base", "demangled", "--kernel-name",
                         "regex:jax_sparsek|SegmentedRadixSort", "--launch-count", "400"]
    assert cmd[14:] == ["/py", "-m", "benchmarks.profile", "seed003", "--scale-down", "2", "--pass", "fwd",
                        "--child"]
    assert profile.command("seed003", passes="fwd+bwd")[-3:] == ["--pass", "fwd+bwd", "--child"]
    kernels = profile.parse_ncu_csv(NCU_SAMPLE)
    assert [k["name"] for k in kernels] == ["flash_fwd_kernel"] * 2 + ["lse_fixup"]
    first = kernels[0]
    assert first["duration_us"] == pytest.approx(13710.0) and first["sm_pct"] == 78.35
    assert first["memory_pct"] == 31.2 and first["dram_pct"] == 8.41
    assert first["grid"] == "(132, 1, 1)" and first["block"] == "(384, 1, 1)"
    assert kernels[2]["duration_us"] == pytest.approx(1250.5) and "sm_pct" not in kernels[2]
    text = profile.summary(kernels, "seed003 forward").splitlines()
    assert text[0] == "seed003 forward"
    # flash_fwd_kernel: two launches add up; throughputs weighted by duration.
    assert "flash_fwd_kernel" in text[2] and "27400.0" in text[2] and text[2].split()[1] == "2"
    assert text[2].split()[2] == "78.4" and text[2].split()[3] == "31.1"
    assert "lse_fixup" in text[3] and text[3].split()[2] == "-"  # no SM throughput sampled
    assert text[-1].split()[:2] == ["28650.5", "us"] and "3 launches of 2 kernels" in text[-1]
    assert profile.parse_ncu_csv("==PROF== no kernels were profiled") == []


SOURCE_SAMPLE = '''==PROF== Disconnected
"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)","stall_wait"
"0x10","      HGMMA.64x128x16.F32 R24, gdesc[UR4], RZ","1,200","900","3"
"0x20","      SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR9], R11","600","600","0"
"0x30","      FMUL.FTZ R25, R25, UR6","","",""
"0x40","      MUFU.EX2 R4, R4","200","10","1"
'''


def test_ncu_kernel_detail():
    profile_cmd, details, source = profile.detail_commands("sparsek-long32k", "fwd_gather", "/tmp/rep",
                                                           ncu="/opt/ncu", python="/py")
    assert profile_cmd[:3] == ["/opt/ncu", "--clock-control", "none"]
    sections = [profile_cmd[i + 1] for i, a in enumerate(profile_cmd) if a == "--section"]
    assert sections == list(profile.DETAIL_SECTIONS) and "WarpStateStats" in sections
    assert profile_cmd[profile_cmd.index("--kernel-name") + 1] == "regex:fwd_gather"
    assert profile_cmd[profile_cmd.index("--launch-count") + 1] == "1"
    assert profile_cmd[profile_cmd.index("-o") + 1] == "/tmp/rep"
    assert profile_cmd[-9:] == ["/py", "-m", "benchmarks.profile", "sparsek-long32k", "--scale-down", "1",
                                "--pass", "fwd", "--child"]
    assert details == ["/opt/ncu", "-i", "/tmp/rep.ncu-rep", "--page", "details"]
    assert source == ["/opt/ncu", "-i", "/tmp/rep.ncu-rep", "--page", "source", "--csv", "--print-source", "sass"]
    # Instructions by their share of the stall samples, most first; empty counts are 0.
    lines = profile.top_stalls(SOURCE_SAMPLE, count=3).splitlines()
    assert "2000 in all" in lines[0]
    assert lines[1].split()[:2] == ["60.0%", "0x10"] and "HGMMA" in lines[1]
    assert lines[2].split()[:2] == ["30.0%", "0x20"] and "TRYWAIT" in lines[2]
    assert lines[3].split()[:2] == ["10.0%", "0x40"] and len(lines) == 4
    assert profile.top_stalls("no csv here") == "no source page\n"


def test_profile_without_ncu_says_so(monkeypatch, capsys):
    monkeypatch.setattr(profile.shutil, "which", lambda _: None)
    assert cli.main(["--profile", "decode32k"]) == []
    assert "ncu is not on PATH" in capsys.readouterr().out
    # The child (what ncu would run) runs here too: a forward, and a forward and backward.
    profile.main(["decode32k", "--scale-down", "64", "--child"])
    profile.main(["sparsek-seed003", "--scale-down", "64", "--pass", "fwd+bwd", "--child"])
