"""`lilliput bench --peer vllm|llama.cpp`: `lilliput serve` beside a serving peer, same model, same workloads.

Rows, each a server process of its own, started one at a time (they would share the cores):
- lilliput bf16: `lilliput serve --dtype bfloat16 --no-quantize` on the model (served as loaded: without
  --no-quantize a float model is served as int8, quantized on load);
- lilliput int8: `lilliput serve --model FOLDER`, the model quantized to int8 (RTN per channel) and saved;
- the peer's rows. vllm: vLLM's CPU build (its own venv, `lilliput.eval.peers.ensure_vllm`) serving
  lilliput's Hugging Face export in bfloat16 and float32 (without AVX-512 BF16, oneDNN has no bf16
  matmul and vLLM falls back to torch's), and lilliput's int8 model as a compressed-tensors W8A8
  folder (`write_w8a8`: the same int8 codes; vLLM quantizes activations per token), with the engine
  bound to the same cores and the libraries its CPU guide preloads. llama.cpp: llama-cpp-python's
  server on lilliput's GGUF exports, BF16 and Q8_0.

Each server gets a warm-up, then the two workloads of `lilliput.eval.serve_peer` through its OpenAI
endpoint, `repeats` times each: (a) `streams` concurrent streams of `new_tokens` tokens, (b) the mixed
arrivals of bench/engine.py. Every flag a server was started with is in the record. Ratios are
lilliput's output tokens/s over the peer's on workload (a); greedy text equality compares lilliput
bf16's completions with the peer's bf16 completions of the same requests. The peer's best row
(highest output tok/s on workload a) is the denominator of `serve_int8_vs_<peer>_best`.

Exports and the int8 checkpoint are written once into `$LILLIPUT_CACHE/peers/models/` and reused.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lilliput.eval import serve_peer as sp
from lilliput.eval.peers import peers_dir


@dataclass(frozen=True)
class PeerBenchConfig:
    """`lilliput bench --peer`: the serving comparison against a peer, on one model."""

    peer: str = "vllm"
    """The serving peer: vllm (vLLM's CPU build on the Hugging Face export) or llama.cpp (llama-cpp-python's server on GGUF exports)."""
    model: str | None = None
    """A .gguf file, a model folder or a hub id; the embedded SmolLM2-135M-Instruct when omitted."""
    streams: int = 16
    """Concurrent streams of workload (a)."""
    new_tokens: int = 64
    """Output tokens of each stream of workload (a)."""
    prompt_tokens: int = 64
    """Prompt tokens of each stream of workload (a)."""
    requests: int = 32
    """Requests of workload (b), bench/engine.py's mixed arrivals (16-256 prompt, 16-128 new tokens)."""
    rate: float = 16.0
    """Poisson arrivals per second of workload (b)."""
    repeats: int = 3
    """Runs of each workload per server (median output tok/s)."""
    max_batch: int = 16
    """Sequences every server decodes together (lilliput --max-batch, vLLM --max-num-seqs)."""
    threads: int | None = None
    """CPU threads of every server (None: all cores in this process's affinity)."""
    rows: tuple[str, ...] = ()
    """Rows to run, e.g. "lilliput bf16,vLLM bf16" (empty: all of the peer's rows)."""
    install: bool = True
    """Install the peer when it is absent (vLLM: a venv of its own, minutes; llama.cpp: a build, ~9 minutes)."""

    def __post_init__(self):
        if self.peer not in PEERS:
            raise ValueError(f"unknown peer {self.peer!r}: pass one of {', '.join(PEERS)}")
        for name in ("streams", "new_tokens", "prompt_tokens", "requests", "repeats", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rate <= 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (or None for all cores), got {self.threads}")
        unknown = sorted(set(self.rows) - set(row_names(self.peer)))
        if unknown:
            raise ValueError(f"unknown rows {unknown}: pick from {', '.join(row_names(self.peer))}")


@dataclass(frozen=True)
class Row:
    engine: str
    """lilliput or the peer's name."""
    format: str
    """The weights it serves: bf16, fp32, int8, Q8_0."""
    command: Callable[[int], list[str]]
    """The server's command line for a port."""
    env: dict[str, str] = field(default_factory=dict)
    body: Callable[[sp.Request], dict] = sp.token_body
    """How a request becomes a /v1/completions body for this server."""
    health: str = "/health"
    """The path that answers 200 once the server is ready."""

    @property
    def name(self) -> str:
        return f"{self.engine} {self.format}"


def threads_of(cfg: PeerBenchConfig) -> int:
    return cfg.threads or len(os.sched_getaffinity(0))


# --- artefacts: written once, reused ----------------------------------------------------------------

class Artefacts:
    """The model, its tokenizer and the files the servers load, cached under peers/models/<model key>."""

    def __init__(self, spec: str | None):
        from lilliput.core.checkpoint import load_model
        from lilliput.eval.bench import model_label

        self.spec, self.label = spec, model_label(spec)
        key = hashlib.sha1(str(Path(spec).resolve() if spec and Path(spec).exists() else spec).encode()).hexdigest()[:8]
        self.folder = peers_dir() / "models" / f"{self.label.replace(' ', '_').replace('/', '_')}-{key}"
        self.model, self.tokenizer = load_model(spec, device="cpu")
        self.made: dict[str, dict] = {}

    def _once(self, name: str, write: Callable[[Path], None]) -> Path:
        path = self.folder / name
        t0 = time.perf_counter()
        if not path.exists():
            print(f"writing {path}", file=sys.stderr)
            write(path)
            self.made[name] = {"seconds": round(time.perf_counter() - t0, 1), "reused": False}
        else:
            self.made.setdefault(name, {"reused": True})
        return path

    def export(self, format: str, type: str) -> Path:
        from lilliput.export import export

        suffix = ".gguf" if format == "gguf" else ""
        return self._once(f"{format}-{type}{suffix}",
                          lambda p: export(self.model, self.tokenizer, format, p, type, source=self.spec))

    def int8(self) -> Path:
        import copy

        from lilliput.compress.quantize import RTNConfig, quantize_
        from lilliput.core.checkpoint import save_checkpoint

        def write(p: Path) -> None:
            save_checkpoint(quantize_(copy.deepcopy(self.model), RTNConfig(bits=8)), self.tokenizer, p,
                            {"label": f"{self.label} + int8 RTN"})

        return self._once("lilliput-int8", write)

    def int8_w8a8(self) -> Path:
        """The int8 checkpoint's model in vLLM's int8 format (compressed-tensors W8A8)."""
        from lilliput.core.checkpoint import load_model

        return self._once("hf-int8-w8a8", lambda p: write_w8a8(load_model(str(self.int8()), device="cpu")[0],
                                                              self.tokenizer, p))


# --- the rows of each side --------------------------------------------------------------------------

def lilliput_rows(cfg: PeerBenchConfig, art: Artefacts) -> list[Row]:
    """Only explicit flags: the bf16 row asks for bfloat16 weights served as loaded (--no-quantize), the int8
    row names an int8 checkpoint (files are written when a row starts, so a row left out writes none)."""
    base = [sys.executable, "-m", "lilliput.cli", "serve", "--host", "127.0.0.1", "--served-name", sp.SERVED_NAME,
            "--max-batch", str(cfg.max_batch), "--device", "cpu"]
    model = ["--model", art.spec] if art.spec else []
    env = {"OMP_NUM_THREADS": str(threads_of(cfg))}
    return [Row("lilliput", "bf16", lambda port: [*base, "--port", str(port), *model, "--dtype", "bfloat16",
                                                   "--no-quantize"], env),
            Row("lilliput", "int8", lambda port: [*base, "--port", str(port), "--model", str(art.int8())], env)]


def write_w8a8(model, tokenizer, path: Path) -> None:
    """`model` (int8 RTN: symmetric per output channel) as a compressed-tensors W8A8 folder, the int8
    format vLLM's CPU build runs: the same int8 codes and scales, activations quantized per token at
    run time by vLLM; embeddings, norms and the output layer in bfloat16 (the output layer dequantized)."""
    import json

    import torch
    from safetensors.torch import save_file

    from lilliput.export.hf import generation_config, hf_config
    from lilliput.export.vocab import as_bpe
    from lilliput.export.weights import hf_weights

    state = {}
    for name, w in hf_weights(model).items():
        if isinstance(w, torch.Tensor):
            state[name] = w.to(torch.bfloat16).contiguous()
        elif w.bits == 8 and name.startswith("model.layers."):
            state[name] = w.codes.to(torch.int8).contiguous()  # (N, K)
            state[name.removesuffix("weight") + "weight_scale"] = w.scale.reshape(-1, 1).to(torch.bfloat16)  # (N, 1)
        else:
            state[name] = w.dequantize().to(torch.bfloat16).contiguous()
    tok = as_bpe(tokenizer)
    cfg = hf_config(model, "bfloat16", tok)
    scheme = {"num_bits": 8, "type": "int", "symmetric": True}
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"], "config_groups": {"group_0": {
            "targets": ["Linear"], "weights": {**scheme, "strategy": "channel", "dynamic": False},
            "input_activations": {**scheme, "strategy": "token", "dynamic": True}}}}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    (tmp / "generation_config.json").write_text(json.dumps(generation_config(tok)))
    tok.save(tmp)
    tmp.rename(path)


VLLM_PRELOAD = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "lib/libiomp5.so")
"""What vLLM's CPU guide preloads for speed (tcmalloc from the system, Intel OpenMP from its venv), where present."""


class VllmPeer:
    name, key = "vLLM", "vllm"
    formats = ("bf16", "fp32", "int8")

    def install(self, cfg: PeerBenchConfig) -> dict:
        from lilliput.eval.peers import ensure_vllm, vllm_install_note

        t0 = time.perf_counter()
        self.python = ensure_vllm(install=cfg.install)
        return {**vllm_install_note(), "install_seconds_this_run": round(time.perf_counter() - t0, 1)}

    def rows(self, cfg: PeerBenchConfig, art: Artefacts) -> list[Row]:
        n = threads_of(cfg)
        cpus = sorted(os.sched_getaffinity(0))[:n]
        venv = self.python.parent.parent
        preload = [str(p) for p in (venv / lib for lib in VLLM_PRELOAD) if p.is_file()]
        # vLLM's "auto" binding keeps one core for its scheduler process: on a 2-core machine that halves
        # its engine, so the engine is bound to the same cores lilliput uses and none is reserved
        env = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus)),
               "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "OMP_NUM_THREADS": str(n),
               **({"LD_PRELOAD": ":".join(preload)} if preload else {})}

        def command(folder: Callable[[], Path], dtype: str) -> Callable[[int], list[str]]:
            return lambda port: [
                str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder()),
                "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port), "--served-model-name", sp.SERVED_NAME,
                "--max-num-seqs", str(cfg.max_batch), "--max-model-len", "2048"]

        return [Row(self.name, "bf16", command(lambda: art.export("hf", "bfloat16"), "bfloat16"), env),  # formats' order
                Row(self.name, "fp32", command(lambda: art.export("hf", "float32"), "float32"), env),
                Row(self.name, "int8", command(lambda: art.int8_w8a8(), "bfloat16"), env)]


class LlamaCppPeer:
    name, key = "llama.cpp", "llamacpp"
    formats = {"bf16": "BF16", "Q8_0": "Q8_0"}

    def install(self, cfg: PeerBenchConfig) -> dict:
        from lilliput.eval.peers import ensure_llama_cpp, ensure_llama_cpp_server, llama_cpp_build_options

        t0 = time.perf_counter()
        llama_cpp = ensure_llama_cpp(install=cfg.install)
        ensure_llama_cpp_server(install=cfg.install)
        return {"llama_cpp": llama_cpp.__version__, "build_options": llama_cpp_build_options(llama_cpp),
                "install_seconds_this_run": round(time.perf_counter() - t0, 1)}

    def rows(self, cfg: PeerBenchConfig, art: Artefacts) -> list[Row]:
        n = threads_of(cfg)
        eos = sorted(art.tokenizer.eos_ids)
        out = []
        for fmt, type in self.formats.items():
            out.append(Row(self.name, fmt, lambda port, t=type: [
                sys.executable, "-m", "llama_cpp.server", "--model", str(art.export("gguf", t)),
                "--model_alias", sp.SERVED_NAME,
                "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(n), "--n_threads_batch", str(n),
                "--n_ctx", "2048", "--interrupt_requests", "False"],  # queue concurrent requests, not cut them off
                body=lambda r: sp.text_body(r, art.tokenizer, eos), health="/v1/models"))
        return out


PEERS = {"vllm": VllmPeer, "llama.cpp": LlamaCppPeer}


def row_names(peer: str) -> list[str]:
    """Every row a comparison with `peer` runs, in order: lilliput's, then the peer's."""
    p = PEERS[peer]
    return ["lilliput bf16", "lilliput int8", *(f"{p.name} {f}" for f in p.formats)]


# --- the run ----------------------------------------------------------------------------------------

def measure_row(row: Row, streams: list[sp.Request], arrivals: list[sp.Request], repeats: int) -> dict:
    """Start the row's server, warm it up, run both workloads, stop it."""
    port = sp.free_port()
    cmd = row.command(port)
    print(f"{row.name}: starting ({' '.join(cmd[2:5])} ...)", file=sys.stderr)
    out = {"engine": row.engine, "format": row.format, "command": cmd, "env": row.env}
    try:
        with sp.ServerProcess(cmd, port, row.env, health=row.health) as srv:
            out["startup_seconds"] = round(srv.ready_seconds, 1)
            sp.run_workload(srv.url, streams[:2], row.body)  # warm-up: the first requests compile or page in
            out["streams"] = sp.repeat_workload(srv.url, streams, repeats, row.body)
            out["arrivals"] = sp.repeat_workload(srv.url, arrivals, repeats, row.body)
    except (RuntimeError, TimeoutError, OSError) as e:
        out["error"] = str(e).strip().splitlines()[0][:300]
        out["log_tail"] = str(e)[-1500:]
    return out


def run_peer_bench(cfg: PeerBenchConfig, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict:
    """Install the peer (timed), write the files the servers load, measure every row; the result's fields."""
    peer = PEERS[cfg.peer]()
    install = peer.install(cfg)
    log(f"{peer.name} ready (install {install.get('install_seconds_this_run')} s this run)")
    art = Artefacts(cfg.model)
    rows = lilliput_rows(cfg, art) + peer.rows(cfg, art)
    if cfg.rows:
        rows = [r for r in rows if r.name in cfg.rows]
    tok = art.tokenizer
    streams = sp.stream_requests(tok, cfg.streams, cfg.prompt_tokens, cfg.new_tokens, seed=0)
    arrivals = sp.mixed_requests(tok, cfg.requests, cfg.rate, seed=0)
    measured = []
    for row in rows:
        got = measure_row(row, streams, arrivals, cfg.repeats)
        log(f"{row.name}: " + (f"ERROR {got['error']}" if "error" in got else
                               f"streams {got['streams']['output_tok_s']} tok/s, arrivals "
                               f"{got['arrivals']['output_tok_s']} tok/s, TTFT p50 {got['streams']['ttft_p50_s']} s"))
        measured.append(got)
    return summary(cfg, peer, measured, install, art)


def summary(cfg: PeerBenchConfig, peer, measured: list[dict], install: dict, art: Artefacts) -> dict:
    """Ratios on workload (a), the peer's best row, greedy text equality; per-row figures without texts."""
    by = {f"{m['engine']} {m['format']}": m for m in measured if "error" not in m}

    def rate(name: str) -> float | None:
        return by[name]["streams"]["output_tok_s"] if name in by else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    peer_rows = {n: rate(n) for n in by if by[n]["engine"] == peer.name}
    best = max(peer_rows, key=peer_rows.get) if peer_rows else None
    equality = {}
    ours = by.get("lilliput bf16")
    for name in peer_rows:
        if ours is not None:
            equality[f"lilliput bf16 vs {name}"] = {
                w: sp.text_equality(ours[w]["texts"], by[name][w]["texts"]) for w in ("streams", "arrivals")}
    bf16_pair = equality.get(f"lilliput bf16 vs {peer.name} bf16")
    identical = None
    if bf16_pair:
        n = sum(e["compared"] for e in bf16_pair.values())
        identical = round(sum(e["identical"] for e in bf16_pair.values()) / n, 3) if n else None
    rows = [{**m, **{w: {k: v for k, v in m[w].items() if k != "texts"} for w in ("streams", "arrivals") if w in m}}
            for m in measured]
    k = peer.key
    return {
        "peer": cfg.peer, "peer_key": k, "model": art.label, "config": {f: getattr(cfg, f) for f in cfg.__dataclass_fields__},
        "threads": threads_of(cfg),
        f"serve_bf16_vs_{k}_bf16": ratio(rate("lilliput bf16"), rate(f"{peer.name} bf16")),
        f"serve_int8_vs_{k}_bf16": ratio(rate("lilliput int8"), rate(f"{peer.name} bf16")),
        f"serve_int8_vs_{k}_best": ratio(rate("lilliput int8"), rate(best) if best else None),
        f"{k}_best_format": by[best]["format"] if best else None,
        "greedy_identical_bf16": identical,
        "text_equality": equality,
        f"{k}_install": install, "files": {"folder": str(art.folder), **art.made},
        "workloads": {"streams": {"streams": cfg.streams, "prompt_tokens": cfg.prompt_tokens,
                                  "new_tokens": cfg.new_tokens},
                      "arrivals": {"requests": cfg.requests, "rate_per_s": cfg.rate, "seed": 0}},
        "rows": rows,
        "note": "output tok/s: output tokens of all requests / wall time from the first send to the last token "
                "(median of repeats); TTFT from each request's send (its arrival in workload b), p50/p99 of the "
                "median run. Every request: /v1/completions, streaming, temperature 0, ignore_eos, prompt as "
                "token ids (llama.cpp: as text, EOS banned by logit_bias). Ratios on workload (a). Greedy "
                "text equality: share of identical completions, lilliput bf16 vs the peer's bf16 row. Servers "
                "run one at a time on the same cores.",
    }


def headline(result: dict) -> str:
    """The ratios of a result in one line."""
    k = result["peer_key"]
    return ", ".join(f"{name} {result[name]}" for name in (f"serve_bf16_vs_{k}_bf16", f"serve_int8_vs_{k}_bf16",
                                                           f"serve_int8_vs_{k}_best")) + \
        f" (best {result[f'{k}_best_format']}); identical greedy completions at bf16 {result['greedy_identical_bf16']}"
