"""The Python parts of tools/gpu_check.sh (see there):

    python tools/gpu_check_report.py versions OUTDIR          -> versions.json
    python tools/gpu_check_report.py kernels OUTDIR MODE      -> kernels.json
    python tools/gpu_check_report.py summary OUTDIR MODE BUDGET -> results.json, summary.txt

Each reads only what the earlier stages left in OUTDIR, and a stage that left
nothing (it failed, or was cut off) shows as such in the summary.
"""

from __future__ import annotations

import datetime
import glob
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(cmd: list[str], timeout: float = 30) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (done.stdout + done.stderr).strip()
    except (OSError, subprocess.SubprocessError) as error:
        return f"<{error}>"


def load_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path: str, payload) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)


# -- versions -------------------------------------------------------------------------------------
def versions(out: str) -> int:
    info: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "python": platform.python_version(), "machine": platform.machine(),
                  "cores": os.cpu_count()}
    import torch

    info.update({"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                 "torch_git": getattr(torch.version, "git_version", None),
                 "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
                 "cuda_available": torch.cuda.is_available()})
    if torch.backends.cudnn.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update({"gpu": props.name, "gpu_count": torch.cuda.device_count(),
                     "compute_capability": "%d.%d" % (props.major, props.minor),
                     "gpu_memory_gib": round(props.total_memory / 2**30, 1)})
    if shutil.which("nvidia-smi"):
        query = sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                    "--format=csv,noheader"])
        info["nvidia_smi"] = query
        first = query.splitlines()[0].split(",") if query and not query.startswith("<") else []
        if len(first) >= 2:
            info["driver"] = first[1].strip()
        print(sh(["nvidia-smi"]))
    else:
        info["nvidia_smi"] = "not found"
    # The toolkit the build will use: setup.py's own search.
    try:
        spec = importlib.util.spec_from_file_location("fusedclip_setup",
                                                      os.path.join(ROOT, "setup.py"))
        setup_py = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(setup_py)
        toolkit, looked = setup_py.find_cuda_toolkit()
        info["cuda_toolkit"] = toolkit
        if toolkit is None:
            info["cuda_toolkit_search"] = looked
    except (SystemExit, Exception) as error:  # a bad CUDA_HOME is reported, not raised
        info["cuda_toolkit"] = None
        info["cuda_toolkit_error"] = str(error)
    nvcc = (os.path.join(info["cuda_toolkit"], "bin", "nvcc") if info.get("cuda_toolkit")
            else shutil.which("nvcc"))
    if nvcc:
        release = re.search(r"release [^\n]*", sh([nvcc, "--version"]))
        info["nvcc"] = f"{nvcc}: {release.group(0) if release else '?'}"
    else:
        info["nvcc"] = None
    path_nvcc = shutil.which("nvcc")
    info["nvcc_on_path"] = (f"{path_nvcc} -> {os.path.realpath(path_nvcc)}" if path_nvcc
                            else None)
    info["cxx"] = sh([os.environ.get("CXX", "c++"), "--version"]).splitlines()[0]
    info["ninja"] = sh(["ninja", "--version"]) if shutil.which("ninja") else None
    for module in ("pytest", "pytest_timeout", "numpy", "transformers", "lightning"):
        try:
            mod = __import__(module)
            info[module] = getattr(mod, "__version__", "present")
        except Exception:
            info[module] = None
    commit = sh(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    info["commit"] = commit if re.fullmatch(r"[0-9a-f]{4,40}", commit) else None
    write_json(os.path.join(out, "versions.json"), info)
    print()
    for key, value in info.items():
        print(f"{key:>20}: {value}")
    return 0


# -- kernels --------------------------------------------------------------------------------------
def kernels(out: str, mode: str) -> int:
    import torch

    result: dict = {"mode": mode}
    try:
        import fusedclip
        from fusedclip import ops
    except Exception as error:
        result["import_error"] = repr(error)
        write_json(os.path.join(out, "kernels.json"), result)
        print(f"import fusedclip failed: {error!r}")
        return 1
    result["fusedclip_file"] = fusedclip.__file__
    result["cpu_tuning"] = list(ops.cpu_tuning())

    def registered(key):
        return sorted(op for op in torch._C._dispatch_get_registrations_for_dispatch_key(key)
                      if op.startswith("fusedclip::"))

    result["cpu_ops"], result["cuda_ops"] = registered("CPU"), registered("CUDA")
    result["missing_cuda"] = sorted(set(result["cpu_ops"]) - set(result["cuda_ops"]))
    print(f"fusedclip from {fusedclip.__file__}; CPU tuning {result['cpu_tuning']}")
    print(f"ops with a CPU kernel:  {', '.join(result['cpu_ops'])}")
    print(f"ops with a CUDA kernel: {', '.join(result['cuda_ops']) or 'none'}")
    rc = 0
    if result["missing_cuda"]:
        print(f"NO CUDA kernel: {', '.join(result['missing_cuda'])}")
        rc = 1 if mode == "gpu" else 0
    if mode == "gpu" and torch.cuda.is_available() and not result["missing_cuda"]:
        # One launch of the norm kernel before the tests: a crash shows here first.
        x = torch.arange(1, 100_001, device="cuda", dtype=torch.float32)
        try:
            _, total, flag = ops.multi_tensor_norm([x, x[:7]], 2.0)
            got, want = float(total), float(torch.linalg.vector_norm(torch.cat([x, x[:7]]).double()))
            result["smoke_norm"] = {"got": got, "want": want, "flag": float(flag)}
            ok = abs(got - want) <= 1e-5 * want and float(flag) == 0.0
            print(f"smoke: multi_tensor_norm on cuda {got!r} vs {want!r}: {'ok' if ok else 'WRONG'}")
            rc = rc or (0 if ok else 1)
        except Exception as error:
            result["smoke_norm"] = {"error": repr(error)}
            print(f"smoke: multi_tensor_norm on cuda raised {error!r}")
            rc = 1
    write_json(os.path.join(out, "kernels.json"), result)
    return rc


# -- summary --------------------------------------------------------------------------------------
def read_stages(out: str) -> list[dict]:
    stages = []
    try:
        with open(os.path.join(out, "stages.tsv")) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 5:
                    stages.append({"stage": parts[0], "status": parts[1], "exit": parts[2],
                                   "seconds": int(parts[3] or 0), "budget_s": parts[4],
                                   "note": parts[5] if len(parts) > 5 else ""})
    except OSError:
        pass
    return stages


VERBOSE_RESULT = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")


def test_outcomes(out: str, stage: str) -> dict | None:
    """Counts and failures of one pytest stage: from its junit XML, else (the
    run was cut off) from its -v log, with the test it was in when it ended."""
    junit = os.path.join(out, f"junit-{stage}.xml")
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures: list[str] = []
    if os.path.exists(junit):
        try:
            root = ET.parse(junit).getroot()
            for case in root.iter("testcase"):
                name = f"{case.get('classname', '')}::{case.get('name', '')}"
                kids = {child.tag: child for child in case}
                if "failure" in kids or "error" in kids:
                    key = "failed" if "failure" in kids else "errors"
                    counts[key] += 1
                    element = kids["failure"] if "failure" in kids else kids["error"]
                    message = element.get("message", "")
                    failures.append(f"{name}: {message.splitlines()[0][:160] if message else ''}")
                elif "skipped" in kids:
                    counts["skipped"] += 1
                else:
                    counts["passed"] += 1
            return {"source": "junit", **counts, "failures": failures}
        except ET.ParseError:
            pass
    log = os.path.join(out, f"{stage}.log")
    if not os.path.exists(log):
        return None
    last_started = None
    with open(log, errors="replace") as f:
        for line in f:
            found = VERBOSE_RESULT.match(line)
            if found:
                outcome = found.group(2)
                key = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors",
                       "SKIPPED": "skipped", "XFAIL": "skipped", "XPASS": "passed"}[outcome]
                counts[key] += 1
                if key in ("failed", "errors"):
                    failures.append(found.group(1))
                last_started = None
            elif re.match(r"^tests/\S+::\S+", line):
                last_started = line.split()[0]
    return {"source": "log (no junit: cut off)", **counts, "failures": failures,
            "running_when_it_ended": last_started}


def summary(out: str, mode: str, budget: str) -> int:
    versions_info = load_json(os.path.join(out, "versions.json")) or {}
    kernels_info = load_json(os.path.join(out, "kernels.json"))
    stages = read_stages(out)
    tests = {}
    for s in stages:
        if s["stage"].startswith("cuda-tests-") or s["stage"] == "suite":
            tests[s["stage"]] = test_outcomes(out, s["stage"])
    cuda_vs_cpu = load_json(os.path.join(out, "cuda_vs_cpu.json"))
    bench = load_json(os.path.join(out, "bench_cuda.json"))
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": mode, "budget_s": budget,
        "device": versions_info.get("gpu"), "driver": versions_info.get("driver"),
        "torch": versions_info.get("torch"), "cuda": versions_info.get("torch_cuda"),
        "nvcc": versions_info.get("nvcc"), "versions": versions_info,
        "stages": stages, "kernels": kernels_info, "tests": tests,
        "cuda_vs_cpu": None if cuda_vs_cpu is None else {
            "device": cuda_vs_cpu.get("device"), "per_dtype": cuda_vs_cpu.get("per_dtype"),
            "tolerances": cuda_vs_cpu.get("tolerances"),
            "left_out": cuda_vs_cpu.get("left_out")},
        "bench": bench,
    }
    write_json(os.path.join(out, "results.json"), results)

    lines = []
    v = versions_info
    title = "REHEARSAL (CPU; GPU parts skipped)" if mode != "gpu" else "GPU run"
    lines.append(f"gpu_check summary: {title}, {results['date']}, budget {budget} s")
    lines.append(f"  device {v.get('gpu', '-')} (cc {v.get('compute_capability', '-')}), driver "
                 f"{v.get('driver', '-')}; torch {v.get('torch', '-')} (CUDA "
                 f"{v.get('torch_cuda', '-')}); nvcc {v.get('nvcc', '-')}; python "
                 f"{v.get('python', '-')}; {v.get('cores', '-')} cores")
    total = sum(s["seconds"] for s in stages)
    lines.append(f"  stages ({total} s):")
    for s in stages:
        extra = ""
        t = tests.get(s["stage"])
        if t:
            extra = (f"  {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
                     f"{t['skipped']} skipped")
            if t.get("running_when_it_ended"):
                extra += f"; cut off in {t['running_when_it_ended']}"
        note = f" ({s['note']})" if s["note"] else ""
        lines.append(f"    {s['status']:<7} {s['stage']:<28} {s['seconds']:>4} s / "
                     f"{s['budget_s']:>4} s{note}{extra}")
    if kernels_info:
        if kernels_info.get("import_error"):
            lines.append(f"  kernels: import fusedclip failed: {kernels_info['import_error'][:120]}")
        else:
            missing = kernels_info.get("missing_cuda")
            lines.append(f"  kernels: {len(kernels_info.get('cuda_ops', []))} ops with CUDA kernels"
                         + (f"; MISSING: {', '.join(missing)}" if missing else "")
                         + (f"; smoke {kernels_info['smoke_norm']}" if "smoke_norm" in kernels_info
                            else ""))
    failures = [f for t in tests.values() if t for f in t["failures"]]
    if failures:
        lines.append(f"  failures ({len(failures)}; first {min(len(failures), 6)}):")
        lines += [f"    {f[:150]}" for f in failures[:6]]
    if cuda_vs_cpu and cuda_vs_cpu.get("per_dtype"):
        lines.append(f"  CUDA vs CPU ({cuda_vs_cpu.get('device')} vs cpu): max ulps / max rel / "
                     "fraction of CUDA_VS_CPU:")
        for dname, w in cuda_vs_cpu["per_dtype"].items():
            of_tol = w.get("of_tol", {}).get("value")
            lines.append(f"    {dname:<9} {w['max_ulps']['value']:>8.3g} ulps  "
                         f"{w['max_rel']['value']:.2e} rel  "
                         f"{'-' if of_tol is None else f'{of_tol:.0%}'} of tol  "
                         + (f"(at {w['max_ulps']['where']})" if w['max_ulps']['value'] else ""))
    if cuda_vs_cpu and cuda_vs_cpu.get("left_out"):
        lines.append(f"    left out for time: {len(cuda_vs_cpu['left_out'])} runs "
                     f"(first: {cuda_vs_cpu['left_out'][0]})")
    if bench:
        copy = bench.get("copy_bandwidth_gb_s", {})
        lines.append(f"  bench ({'rehearsal, numbers meaningless' if bench.get('mode', {}).get('rehearsal') else 'GPU'}"
                     f"; copy {copy.get('before', 0):.0f}/{copy.get('after', 0):.0f} GB/s "
                     "before/after):")
        for case in bench.get("cases", []):
            targets = ", ".join(f"{k}: {'MET' if ok else 'MISSED'}"
                                for k, ok in case.get("targets", {}).items())
            lines.append(f"    {case['key']:<5} {case['dtype']:<8} "
                         f"{case['variants']['fusedclip AdamW clip']['median_ms']:.3f} ms, "
                         f"{case['speedup_vs_torch_fused_clip']:.2f}x vs torch fused + clip, "
                         f"{case['fusedclip_fraction_of_copy']:.0%} of copy"
                         + (f"  [{targets}]" if targets else ""))
        for skipped in bench.get("skipped_cases", []):
            lines.append(f"    {skipped['key']:<5} {skipped['dtype']:<8} skipped: {skipped['reason']}")
    bad = [s["stage"] for s in stages if s["status"] != "ok"]
    lines.append("  RESULT: " + ("every stage ok" if not bad else "not ok: " + ", ".join(bad)))
    lines.append("  files: summary.txt results.json versions.json cuda_vs_cpu.json bench_cuda.json "
                 "gpu_check.log logs.tar.gz (<stage>.log, junit-*.xml, stages.tsv)")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(text)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    command, out = argv[0], argv[1]
    if command == "versions":
        return versions(out)
    if command == "kernels":
        return kernels(out, argv[2] if len(argv) > 2 else "gpu")
    if command == "summary":
        return summary(out, argv[2] if len(argv) > 2 else "gpu", argv[3] if len(argv) > 3 else "?")
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
