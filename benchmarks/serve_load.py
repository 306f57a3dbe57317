"""A bounded load test of ``lmadapt serve``: N concurrent streaming clients on loopback, mixed adapters (issue 15).

``lmadapt serve`` runs in a subprocess (the clients do not share its GIL, as in real use) on SmolLM2-135M-Instruct
with ``--adapters`` LoRA adapters made on the spot: r=16, alpha=32 on all seven projections, A and B both
**random** (``init: random``, fixed seeds), saved by lmadapt's ``save_adapter`` so that they load like trained ones.
They were never trained: the figures are about speed only. Client and server share this machine's cores: the
server decodes on ``--threads`` torch threads (default 2), and the clients' event loop takes CPU from the same cores.

Request i is the chat prompt "summarise this article" over the first ``--prompt-words`` words of the demo's
held-out BBC News article i (``lmadapt.recipes.demo_data``), greedy, ``max_tokens`` = ``--max-tokens``. OpenAI's API
has no field that forbids stopping early, so generated tokens are counted from each stream's ``usage`` (the stop
token included) and throughput is generated tokens per second. Three phases, in this order:

- **mixed**: the requests to the server, request i to adapter ``i mod K``;
- **single**: the same requests, all to the first adapter;
- **sequential**: the mixed requests one by one in this process, after the server has stopped, on as many torch
  threads: Hugging Face ``model.generate`` (greedy, the same ``max_new_tokens`` and stop tokens) on the base with
  that request's adapter alone (``lmadapt.api.load``; loading and one warm-up call are not timed).

``--clients`` workers each send their next request when their last one has finished (a closed loop), as streamed
chat completions, so time to first token (the first non-empty text) is what a client sees; latency runs to
``[DONE]``. Each server phase follows untimed warm-up requests and stops at ``--time-cap`` seconds, the requests
still running then counted as unfinished. A request *fails* on a transport error, a status other than 200, an error
event, a stream without ``[DONE]``, finish reason or usage, or a ``length`` finish short of ``max_tokens``. Each mixed
answer is compared with its ``generate`` text (greedy: equal, unless float rounding flips a near-tie).

    python benchmarks/serve_load.py                                              # 8 clients, 32 requests, 64 tokens
    python benchmarks/serve_load.py --requests 4 --max-tokens 8 --clients 2      # a smoke run
    python benchmarks/serve_load.py --model tiny --requests 4 --max-tokens 8 --clients 2   # the harness, seconds

Targets (issue 15, 8 clients on SmolLM2): ``mixed_vs_single_throughput`` >= 0.8, ``batched_vs_sequential_throughput``
(mixed against sequential) >= 3, ``failed_requests`` 0. The last line printed is one JSON object with those keys,
``p99_latency_s`` (the mixed phase's) and every phase's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_common import model_folder
from methods import TARGETS, cpu_class

PROMPT = "Summarise this news article in a few sentences.\n\n{article}"
ADAPTER_SEED = 1000  # adapter k draws its factors after torch.manual_seed(ADAPTER_SEED + k)
WARMUP_TOKENS = 4


@dataclass
class Outcome:
    """One request's result: ``error`` None when it succeeded."""

    tokens: int = 0
    latency: float = 0.0
    ttft: float | None = None
    text: str = ""
    error: str | None = None


@dataclass
class Phase:
    """One phase's outcomes (None: not finished within the time cap) and its wall-clock seconds."""

    name: str
    outcomes: list[Outcome | None]
    seconds: float

    def figures(self) -> dict:
        done = [o for o in self.outcomes if o is not None and o.error is None]
        tokens = sum(o.tokens for o in done)
        ttfts = [o.ttft for o in done if o.ttft is not None]
        return {"completed": len(done), "failed": sum(o is not None and o.error is not None for o in self.outcomes),
                "unfinished": sum(o is None for o in self.outcomes), "seconds": round(self.seconds, 3),
                "generated_tokens": tokens, "requests_per_s": _rate(len(done), self.seconds),
                "tokens_per_s": _rate(tokens, self.seconds),
                "p50_latency_s": _quantile([o.latency for o in done], 0.5),
                "p99_latency_s": _quantile([o.latency for o in done], 0.99),
                "p50_ttft_s": _quantile(ttfts, 0.5), "p99_ttft_s": _quantile(ttfts, 0.99)}


def _rate(count: float, seconds: float) -> float | None:
    return round(count / seconds, 3) if seconds > 0 else None


def _quantile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile, linear between order statistics (numpy's default); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    at = q * (len(ordered) - 1)
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return round(ordered[low] + (ordered[high] - ordered[low]) * (at - low), 4)


# ---------------------------------------------------------------------------------------------- prompts, adapters

def make_prompts(count: int, words: int) -> list[str]:
    """The summarising prompts over the first ``words`` words of the first ``count`` held-out BBC articles."""
    from lmadapt.recipes.demo_data import bbc_news

    _, test_rows, _ = bbc_news(seed=0)
    if count > len(test_rows):
        raise SystemExit(f"--requests {count}: the demo's held-out split has {len(test_rows)} articles")
    return [PROMPT.format(article=" ".join(r["text"].split()[:words])) for r in test_rows[:count]]


def make_adapters(model_path: str, model_name: str, dtype: str, count: int, root: Path) -> dict[str, str]:
    """``count`` random LoRA adapters of the model (name -> folder), saved with the base's fingerprint."""
    import torch

    from lmadapt.adapters.format import save_adapter
    from lmadapt.methods import build_method
    from lmadapt.models.fingerprint import fingerprint
    from lmadapt.models.loading import ModelConfig, load_model

    base, _ = load_model(ModelConfig(model_path, dtype=dtype))
    base_fingerprint = fingerprint(base)
    folders = {}
    for k in range(count):
        model = copy.deepcopy(base)
        torch.manual_seed(ADAPTER_SEED + k)
        method = build_method({"name": "lora", "r": 16, "alpha": 32, "target_modules": TARGETS, "init": "random"})
        method.apply(model)
        folders[f"lora{k}"] = str(save_adapter(model, method, root / f"lora{k}", base_model=model_name,
                                               base_fingerprint=base_fingerprint))
        del model
    return folders


# ---------------------------------------------------------------------------------------------------- the server

@contextlib.contextmanager
def served(model: str, adapters: dict[str, str], *, dtype: str, threads: int,
           batch: int) -> Iterator[tuple[str, collections.deque[str]]]:
    """(URL, the last lines of its log) of ``lmadapt serve`` in a subprocess on a free loopback port, once healthy;
    stopped by SIGTERM (a drained shutdown) afterwards, killed if it has not exited 60 s later."""
    command = [sys.executable, "-m", "lmadapt", "serve", "--model", model, "--served-model-name", "base",
               "--dtype", dtype, "--port", "0", "--threads", str(threads), "--max-batch-size", str(batch),
               "--log-level", "warning"] + [f"--adapter={name}={path}" for name, path in adapters.items()]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    log: collections.deque[str] = collections.deque(maxlen=40)
    try:
        url = None
        for line in process.stderr:
            log.append(line.rstrip())
            if match := re.search(r"(http://\S+)/v1 serving", line):
                url = match.group(1)
                break
        if url is None:
            raise SystemExit(f"lmadapt serve exited ({process.wait()}) before listening:\n" + "\n".join(log))
        threading.Thread(target=lambda: log.extend(line.rstrip() for line in process.stderr), daemon=True).start()
        deadline = time.monotonic() + 120
        while not _healthy(url):
            if time.monotonic() > deadline:
                raise SystemExit(f"the server at {url} was not healthy after 120 s:\n" + "\n".join(log))
            time.sleep(0.2)
        yield url, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _healthy(url: str) -> bool:
    import httpx2

    try:
        return httpx2.get(f"{url}/health", timeout=5).status_code == 200
    except httpx2.TransportError:
        return False


# ---------------------------------------------------------------------------------------------------- the clients

async def stream_chat(client: Any, url: str, model: str, prompt: str, max_tokens: int) -> Outcome:
    """One streamed greedy chat completion: its outcome, checked for completeness."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    out, start = Outcome(), time.perf_counter()
    finish, usage, done = None, None, False
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                out.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return out
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    out.error = f"error event: {chunk['error'].get('message')}"
                    return out
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    piece = choice["delta"].get("content") or ""
                    if piece and out.ttft is None:
                        out.ttft = time.perf_counter() - start
                    out.text += piece
                    finish = choice.get("finish_reason") or finish
    except Exception as exc:  # noqa: BLE001 - any failure of a request is counted, with its reason
        out.error = f"{type(exc).__name__}: {exc}"
        return out
    out.latency = time.perf_counter() - start
    out.tokens = (usage or {}).get("completion_tokens", 0)
    if not done or finish not in ("stop", "length") or usage is None:
        out.error = f"short stream: [DONE] {'seen' if done else 'missing'}, finish {finish}, usage {usage}"
    elif finish == "length" and out.tokens != max_tokens:
        out.error = f"finish 'length' after {out.tokens} of {max_tokens} tokens"
    return out


async def load_phase(url: str, requests: list[tuple[str, str]], clients: int, max_tokens: int,
                     cap: float) -> tuple[list[Outcome | None], float]:
    """(outcome per request, None where not finished by ``cap``; seconds) of ``clients`` closed-loop workers."""
    import httpx2

    outcomes: list[Outcome | None] = [None] * len(requests)
    todo = collections.deque(range(len(requests)))
    start = time.perf_counter()
    last_done = start

    async def worker(client: Any) -> None:
        nonlocal last_done
        while todo and time.perf_counter() - start < cap:
            i = todo.popleft()
            model, prompt = requests[i]
            outcomes[i] = await stream_chat(client, url, model, prompt, max_tokens)
            last_done = time.perf_counter()

    limits = httpx2.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(cap + 60), limits=limits) as client:
        tasks = [asyncio.create_task(worker(client)) for _ in range(clients)]
        _, running = await asyncio.wait(tasks, timeout=cap)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
    return outcomes, (cap if running else last_done - start)


def server_phases(args: argparse.Namespace, model_path: str, adapters: dict[str, str],
                  prompts: list[str]) -> tuple[Phase, Phase]:
    """The mixed and single phases against one server, after one untimed warm-up request per adapter."""
    names = list(adapters)
    mixed = [(names[i % len(names)], p) for i, p in enumerate(prompts)]
    single = [(names[0], p) for p in prompts]

    async def run(url: str, log: collections.deque[str]) -> tuple[Phase, Phase]:
        warm, _ = await load_phase(url, [(n, prompts[0]) for n in names], args.clients, WARMUP_TOKENS, 300.0)
        bad = [o.error if o else "unfinished" for o in warm if o is None or o.error]
        if bad:
            raise SystemExit(f"warm-up requests failed: {bad[0]}\nserver log:\n" + "\n".join(log))
        phases = []
        for name, requests in (("mixed", mixed), ("single", single)):
            say(f"{name}: {len(requests)} requests, {args.clients} clients")
            phases.append(Phase(name, *await load_phase(url, requests, args.clients, args.max_tokens, args.time_cap)))
        return phases[0], phases[1]

    with served(model_path, adapters, dtype=args.dtype, threads=args.threads, batch=args.clients) as (url, log):
        return asyncio.run(run(url, log))


# ------------------------------------------------------------------------------------------ sequential generate

class FirstToken:
    """A ``generate`` streamer that notes when the first new token arrives (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.puts, self.at = 0, None

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def generate_one(model: Any, tokenizer: Any, stops: set[int], prompt: str, new_tokens: int) -> Outcome:
    """One greedy HF ``generate`` of the chat prompt, timed; tokens counted up to and with the first stop token."""
    import torch
    from transformers import GenerationConfig

    from lmadapt.decoding.generation import decode_new, encode_prompt

    ids = torch.tensor([encode_prompt(tokenizer, prompt, chat=True)],  # as the server renders a chat
                       device=next(model.parameters()).device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=new_tokens, use_cache=True,
                              eos_token_id=sorted(stops), pad_token_id=pad)
    streamer = FirstToken()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                             streamer=streamer)
    took = time.perf_counter() - start
    new = out[0, ids.shape[1]:].tolist()
    count = next((j + 1 for j, t in enumerate(new) if t in stops), len(new))
    return Outcome(tokens=count, latency=took, ttft=None if streamer.at is None else streamer.at - start,
                   text=decode_new(tokenizer, new, stops))


def sequential_phase(args: argparse.Namespace, model_path: str, adapters: dict[str, str],
                     prompts: list[str]) -> Phase:
    """The mixed phase's requests one at a time through HF ``generate``, each on the base with its adapter alone;
    loading and one warm-up call per adapter are not timed."""
    from lmadapt.api import load
    from lmadapt.decoding.generation import stop_token_ids

    names = list(adapters)
    outcomes: list[Outcome | None] = [None] * len(prompts)
    seconds = 0.0
    for k, name in enumerate(names):
        model, tokenizer, _ = load(model_path, adapters[name], dtype=args.dtype)
        stops = stop_token_ids(model, tokenizer)
        generate_one(model, tokenizer, stops, prompts[0], WARMUP_TOKENS)
        for i in range(k, len(prompts), len(names)):
            if seconds >= args.time_cap:
                break
            outcomes[i] = generate_one(model, tokenizer, stops, prompts[i], args.max_tokens)
            seconds += outcomes[i].latency
        del model
    return Phase("sequential", outcomes, seconds)


# ---------------------------------------------------------------------------------------------------- reporting

def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


COLUMNS = (("seconds", "seconds", 9, 1), ("requests_per_s", "req/s", 8, 2), ("tokens_per_s", "gen tok/s", 10, 1),
           ("p50_latency_s", "p50 lat", 9, 2), ("p99_latency_s", "p99 lat", 9, 2), ("p50_ttft_s", "p50 TTFT", 10, 2),
           ("p99_ttft_s", "p99 TTFT", 10, 2))


def report(args: argparse.Namespace, words: int, phases: dict[str, Phase]) -> dict:
    """Print the table and any failures; return the result (the JSON line)."""
    figures = {name: phase.figures() for name, phase in phases.items()}
    print(f"\n{args.model} ({args.dtype}), {cpu_class()}, {args.threads} torch threads (server; generate), "
          f"{args.clients} clients, {args.requests} requests, max_tokens {args.max_tokens}, {args.adapters} adapters")
    print(f"{'phase':<11}{'ok/fail/cut':>12}" + "".join(f"{title:>{width}}" for _, title, width, _ in COLUMNS))
    for name, f in figures.items():
        counts = f"{f['completed']}/{f['failed']}/{f['unfinished']}"
        print(f"{name:<11}{counts:>12}" + "".join(
            f"{'-' if f[key] is None else f'{f[key]:.{digits}f}':>{width}}" for key, _, width, digits in COLUMNS))
    for name in ("mixed", "single"):
        for i, o in enumerate(phases[name].outcomes):
            if o is not None and o.error:
                print(f"FAILED: {name} request {i}: {o.error}")
    mixed, single, sequential = (figures[k] for k in ("mixed", "single", "sequential"))
    pairs = [(a, b) for a, b in zip(phases["mixed"].outcomes, phases["sequential"].outcomes)
             if a is not None and b is not None and not a.error]
    same = f"{sum(a.text == b.text for a, b in pairs)}/{len(pairs)}"
    result = {
        "mixed_vs_single_throughput": _ratio(mixed["tokens_per_s"], single["tokens_per_s"]),
        "batched_vs_sequential_throughput": _ratio(mixed["tokens_per_s"], sequential["tokens_per_s"]),
        "failed_requests": mixed["failed"] + single["failed"], "p99_latency_s": mixed["p99_latency_s"],
        "unfinished_requests": mixed["unfinished"] + single["unfinished"],
        "mixed_equal_to_generate": same, "model": args.model, "dtype": args.dtype,
        "cpu_class": cpu_class(), "threads": args.threads, "clients": args.clients, "requests": args.requests,
        "max_tokens": args.max_tokens, "adapters": args.adapters, "prompt_words": words,
        "time_cap_s": args.time_cap, "phases": figures}
    print(f"mixed/single {result['mixed_vs_single_throughput']} (target >= 0.8), batched/sequential "
          f"{result['batched_vs_sequential_throughput']} (target >= 3), failed {result['failed_requests']}, "
          f"mixed answers equal to generate's: {same}")
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in name, folder, or 'tiny' (a smoke run)")
    p.add_argument("--adapters", type=int, default=4, help="random LoRA adapters to serve (default 4)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients, and the server's batch size")
    p.add_argument("--requests", type=int, default=32, help="requests per phase (default 32)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (default 64)")
    p.add_argument("--prompt-words", type=int, default=None,
                   help="words of each article in its prompt (default 120; 12 for --model tiny)")
    p.add_argument("--time-cap", type=float, default=600.0, help="seconds per phase before it is cut (default 600)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server and of generate (default 2)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 where this CPU runs bf16 matmuls faster than fp32, else fp32")
    args = p.parse_args()
    if min(args.adapters, args.clients, args.requests, args.max_tokens, args.threads) < 1 or args.time_cap <= 0:
        raise SystemExit("--adapters, --clients, --requests, --max-tokens, --threads and --time-cap must be positive")
    import torch
    from transformers.utils import logging as hf_logging

    from lmadapt.hardware import resolve_precision
    from lmadapt.models.loading import resolve_device

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    args.dtype = resolve_precision(args.dtype, resolve_device("auto"))  # server and generate both load on "auto"
    words = args.prompt_words or (12 if args.model == "tiny" else 120)
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        model_path = model_folder(args.model, Path(tmp))
        prompts = make_prompts(args.requests, words)
        say(f"making {args.adapters} random LoRA adapters of {args.model} ({args.dtype})")
        adapters = make_adapters(model_path, args.model, args.dtype, args.adapters, Path(tmp) / "adapters")
        mixed, single = server_phases(args, model_path, adapters, prompts)
        say(f"sequential: {len(prompts)} requests through HF generate, one adapter at a time")
        sequential = sequential_phase(args, model_path, adapters, prompts)
    print(json.dumps(report(args, words, {"mixed": mixed, "single": single, "sequential": sequential})))


if __name__ == "__main__":
    main()
