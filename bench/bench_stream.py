"""Streaming static engine vs the in-memory path on random checkpoints of Llama-3.1-70B and -405B widths (issue 37).

Checkpoints (generated once under --ckpt-dir, reused when their config, index and shards match):
  70b        hidden 8192, 64 heads (8 KV), vocabulary 128,256, d_ff 28,672
  405b       hidden 16,384, 128 heads (8 KV), vocabulary 128,256, d_ff 53,248
  70b-small  the 70b widths with 2 layers (block 0 and layer 1): where the in-memory path is tried beside streaming
  70b-v32k   the 70b layer widths with 2 layers and a 32,000-word vocabulary: the in-memory path fits this machine
             here, so the two paths' seconds per layer are compared on one checkpoint in one run
  tiny       a few MB, for a smoke test
"Block 0 and 3 layers" is read as 4 layers: block 0 (whose MLP gives the first_mlp sources) and layers 1-3, the
timed ones. Each is a LlamaForCausalLM checkpoint with transformers' key names, E and U untied, stored in bf16
(random normal, std 0.02; norm gains 1) as model.safetensors.index.json and shards of at most --shard-gib, one
kind of content per shard (embedding; LM head and final norm; one layer's tensors), so checkpoints of the same
widths share shards by hard link. A WordLevel tokenizer of the words "w0".."w{V-1}" makes every word one token.

Per checkpoint and path, in a fresh process with --threads torch threads (1 by default), page cache of the
checkpoint dropped first (posix_fadvise DONTNEED: cold reads, as on a checkpoint larger than memory):
  load      maps_utils.load(path, dtype="float32", stream=True | False), the weights' SHA-256 already in the
            file-hash index (hashed beforehand, once per checkpoint: hash_s)
  columns   the permuted float32 U the scan reads (maps_utils.static.ranks.scan_columns)
  sources   first_mlp source vectors of the pairs (one MLP0 pass)
  layers    maps_utils.static.ranks.target_ranks over the timed layers, --relations x --pairs random word pairs
            (fixed seed), representation first_mlp, float32; seconds per layer from its on_layer callback, less
            the time its first layer spends in block 0's MLP (it builds its own sources): their mean is s/layer;
            layer_cpu_s, the process's CPU seconds per layer (below the wall time where the machine is shared)
  peak      VmHWM of the process (anonymous + file-mapped pages), the sampled peaks of RssAnon and RssFile (every
            50 ms) and VmHWM after each phase; on CUDA also max_memory_allocated
A measurement is run only where its estimated peak (estimate_gib: U's float32 scan columns, 0.5 GiB of process
and the largest of what each phase holds besides: the weights, the tensor being read with its mapped pages, the rank
engine's working set, bounded by its memory budget since a214126) fits --max-gib and the memory available now;
otherwise its row says "does not fit: needs ~N GiB". The machine may be shared: a watchdog kills a measurement when
MemAvailable drops below --min-free-gib, and each measurement sets its own oom_score_adj to 1000. Each row names the
maps_utils commit it measured and any uncommitted files under maps_utils/ at its start (source, source_dirty).

Bound (issue 37): streamed peak RSS <= 1.5 x (E + U + one layer + working chunk), float32, where one layer is the
attention tensors the static engine reads (q, k, v, o) and the working chunk is the rank engine's memory budget
(RunOptions.memory_budget_mb, 512 MiB). Full depth (80 layers for 70B, 126 for 405B):
time = load + columns + sources + per-layer x layers.

  python bench/bench_stream.py                       # this machine: generate (once), measure, print the table
  python bench/bench_stream.py --device cuda --shapes 70b
Writes <out>/stream-<device>[-<compute space>][-<tag>].csv and its manifest (default results/bench) and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
INDEX = "model.safetensors.index.json"
BENCH_FILE = "bench.json"  # written last: the checkpoint is complete
STD = 0.02
CHUNK_ELEMENTS = 2**25  # random values generated 32 M at a time (128 MiB of float32)
WORKING_MB = 512.0  # RunOptions.memory_budget_mb, the rank engine's working chunk
PROCESS_GIB = 0.5  # python + torch + transformers, for the in-memory estimate


@dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int
    kv_heads: int
    vocab: int
    d_ff: int
    layers: int  # in the checkpoint
    full_layers: int  # of the real model, for the extrapolation

    @property
    def d_head(self) -> int:
        return self.hidden // self.heads


W70 = dict(hidden=8192, heads=64, kv_heads=8, d_ff=28672)
SHAPES = {
    "70b": Shape(**W70, vocab=128256, layers=4, full_layers=80),
    "405b": Shape(hidden=16384, heads=128, kv_heads=8, vocab=128256, d_ff=53248, layers=4, full_layers=126),
    "70b-small": Shape(**W70, vocab=128256, layers=2, full_layers=80),
    "70b-v32k": Shape(**W70, vocab=32000, layers=2, full_layers=80),
    "tiny": Shape(hidden=256, heads=8, kv_heads=2, vocab=4096, d_ff=688, layers=4, full_layers=32),
}
PATHS = ("streamed", "in-memory")


# ---- the checkpoints ------------------------------------------------------------------------------------------
def config_dict(shape: Shape) -> dict:
    """config.json of a LlamaForCausalLM with these widths, stored in bf16."""
    import transformers

    llama3 = shape.vocab > 128001
    config = transformers.LlamaConfig(
        hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, intermediate_size=shape.d_ff, vocab_size=shape.vocab,
        tie_word_embeddings=False, rms_norm_eps=1e-5, max_position_embeddings=131072,
        bos_token_id=128000 if llama3 else 1, eos_token_id=128001 if llama3 else 2,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    out = config.to_dict()
    out["torch_dtype"] = "bfloat16"  # the key real checkpoints of transformers 4 carry, beside 5's "dtype"
    return json.loads(json.dumps(out))  # as config.json reads back (integer keys become strings)


def units(shape: Shape) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    """The checkpoint's content in units that never share a shard: ``(unit key, [(tensor name, shape)])``. The key
    names everything a unit's values depend on, so equal keys mean equal tensors (and a shard can be linked)."""
    d, kv = shape.hidden, shape.kv_heads * shape.d_head
    out = [(f"embed|V={shape.vocab}|d={d}", [("model.embed_tokens.weight", (shape.vocab, d))]),
           (f"head|V={shape.vocab}|d={d}", [("lm_head.weight", (shape.vocab, d)), ("model.norm.weight", (d,))])]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        out.append((f"layer{i}|d={d}|h={shape.heads}|kv={shape.kv_heads}|ff={shape.d_ff}", [
            (p + "input_layernorm.weight", (d,)),
            (p + "self_attn.q_proj.weight", (d, d)), (p + "self_attn.k_proj.weight", (kv, d)),
            (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.o_proj.weight", (d, d)),
            (p + "post_attention_layernorm.weight", (d,)),
            (p + "mlp.gate_proj.weight", (shape.d_ff, d)), (p + "mlp.up_proj.weight", (shape.d_ff, d)),
            (p + "mlp.down_proj.weight", (d, shape.d_ff))]))
    return out


def _numel(dims: tuple[int, ...]) -> int:
    n = 1
    for s in dims:
        n *= s
    return n


def plan_shards(shape: Shape, shard_gib: float) -> list[dict]:
    """Shards in order: each ``{"unit", "tensors": [(name, shape)], "bytes", "file"}``, filled greedily up to
    ``shard_gib`` of bf16 within one unit."""
    limit = shard_gib * GIB
    shards = []
    for key, tensors in units(shape):
        current: list = []
        for name, dims in tensors:
            size = _numel(dims) * 2
            if current and sum(_numel(s) * 2 for _, s in current) + size > limit:
                shards.append({"unit": key, "tensors": current})
                current = []
            current.append((name, dims))
        shards.append({"unit": key, "tensors": current})
    for i, s in enumerate(shards):
        s["file"] = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        s["bytes"] = sum(_numel(dims) * 2 for _, dims in s["tensors"])
    return shards


def _shard_matches(path: Path, shard: dict) -> bool:
    """Whether ``path`` is a complete shard with this unit's tensors (its header says so; files are written whole)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            names = sorted(n for n, _ in shard["tensors"])
            return (meta.get("bench_unit") == shard["unit"] and sorted(f.keys()) == names
                    and all(tuple(f.get_slice(n).get_shape()) == tuple(d) for n, d in shard["tensors"]))
    except Exception:  # a missing, cut-off or foreign file is simply not this shard
        return False


def _random_bf16(name: str, unit: str, dims: tuple[int, ...]):
    """One tensor's values, seeded by its unit and name, generated a chunk of rows at a time."""
    import torch

    if len(dims) == 1:
        return torch.ones(dims, dtype=torch.bfloat16)  # norm gains, as LlamaRMSNorm initialises them
    out = torch.empty(dims, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(zlib.crc32(f"{unit}/{name}".encode()))
    rows = max(1, CHUNK_ELEMENTS // dims[1])
    for r in range(0, dims[0], rows):
        chunk = torch.randn((min(rows, dims[0] - r), dims[1]), generator=g)
        out[r:r + chunk.shape[0]] = chunk.mul_(STD)
    return out


def _write_shard(path: Path, shard: dict) -> None:
    from safetensors.torch import save_file

    tensors = {name: _random_bf16(name, shard["unit"], dims) for name, dims in shard["tensors"]}
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": "pt", "bench_unit": shard["unit"]})
    os.replace(tmp, path)


def _tokenizer(folder: Path, vocab: int) -> None:
    """A WordLevel tokenizer whose vocabulary is exactly the words w0 .. w{vocab-1} (one token each)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(folder))


def checkpoint_ready(folder: Path, shape: Shape, shard_gib: float) -> bool:
    """Whether ``folder`` holds this shape's complete checkpoint (config, index, shards of the recorded sizes)."""
    try:
        record = json.loads((folder / BENCH_FILE).read_text())
        index = json.loads((folder / INDEX).read_text())
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    shards = plan_shards(shape, shard_gib)
    expected = {n: s["file"] for s in shards for n, _ in s["tensors"]}
    return (config == config_dict(shape) and record.get("config") == config and index.get("weight_map") == expected
            and all((folder / s["file"]).is_file() and (folder / s["file"]).stat().st_size >= s["bytes"]
                    for s in shards))


def generate(folder: Path, shape: Shape, shard_gib: float, siblings: list[Path]) -> dict:
    """Write (or complete) the checkpoint in ``folder``; shards already there or in ``siblings`` are reused."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / BENCH_FILE).unlink(missing_ok=True)
    shards = plan_shards(shape, shard_gib)
    todo = [s for s in shards if not _shard_matches(folder / s["file"], s)]
    linked, written, t0 = 0, 0, time.perf_counter()
    for s in todo:
        target = folder / s["file"]
        source = next((f for d in siblings if d != folder and (d / BENCH_FILE).is_file()
                       for f in sorted(d.glob("*.safetensors")) if _shard_matches(f, s)), None)
        if source is not None:
            target.unlink(missing_ok=True)
            try:
                os.link(source, target)
                linked += 1
                continue
            except OSError:
                pass  # another file system: write it
        need = s["bytes"] + 2 * GIB
        if shutil.disk_usage(folder).free < need:
            raise SystemExit(f"Not enough disk for {target} ({s['bytes'] / GIB:.1f} GiB and 2 GiB to spare); free "
                             f"space under {folder.parent} or pass another --ckpt-dir.")
        print(f"  writing {target.name} ({s['bytes'] / GIB:.2f} GiB, {s['unit'].split('|')[0]})", flush=True)
        _write_shard(target, s)
        written += 1
    total = sum(s["bytes"] for s in shards)
    index = {"metadata": {"total_size": total}, "weight_map": {n: s["file"] for s in shards for n, _ in s["tensors"]}}
    (folder / INDEX).write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config_dict(shape), indent=2))
    _tokenizer(folder, shape.vocab)
    record = {"shape": dataclasses.asdict(shape), "config": config_dict(shape), "bytes": total, "std": STD,
              "shards": [{"file": s["file"], "unit": s["unit"], "bytes": s["bytes"]} for s in shards],
              "written": written, "linked": linked, "seconds": round(time.perf_counter() - t0, 1)}
    (folder / BENCH_FILE).write_text(json.dumps(record, indent=2))
    return record


# ---- sizes: the bound and the estimates -----------------------------------------------------------------------
def sizes_gib(shape: Shape, pairs: int) -> dict[str, float]:
    """float32 sizes (GiB) of what the bound and the estimates count."""
    d, kv = shape.hidden, shape.kv_heads * shape.d_head
    vocab_side = shape.vocab * d * 4 / GIB
    attention = (2 * d * d + 2 * kv * d) * 4 / GIB  # q, k, v, o
    mlp = 3 * d * shape.d_ff * 4 / GIB
    layer = attention + mlp + 2 * d * 4 / GIB
    rows = shape.heads * pairs * d * 4 / GIB  # one layer's model-space rows w = z W_O, [H·n, d]
    return {"E": vocab_side, "U": vocab_side, "attention": attention, "v_o": (d * d + kv * d) * 4 / GIB,
            "mlp_proj": mlp / 3, "mlp": mlp, "layer": layer, "rows": rows, "chunk": WORKING_MB / 1024,
            "all": 2 * vocab_side + shape.layers * layer + d * 4 / GIB}


def bound_gib(shape: Shape, pairs: int) -> float:
    s = sizes_gib(shape, pairs)
    return 1.5 * (s["E"] + s["U"] + s["attention"] + s["chunk"])


def space_of(shape: Shape, pairs: int, compute_space: str) -> str:
    """The engine's compute space for one call with ``pairs`` rows per head (its own rule)."""
    from maps_utils.static.ranks import pick_space

    return pick_space(compute_space, shape.hidden, shape.d_head, pairs)


def working_gib(shape: Shape, pairs: int, compute_space: str) -> float:
    """The rank engine's largest working set in one layer, besides U's scan columns and the layer's v and o (engine of
    a214126). Model space: the writes ``w = z W_O`` of as many heads as fit memory_budget_mb (at least one head),
    ``[h·n, d]``; beside them either the targets' own entries (gathered target columns and their product with ``w``,
    row blocks of at most the budget each) or the scan's copy of the active rows and its block of scores and masks
    (about the budget): max(3 w, 2 w + budget). Head space: a head's values, its ``W_O[h] U`` block and the block of
    scores, taken as 2 chunks."""
    s = sizes_gib(shape, pairs)
    if space_of(shape, pairs, compute_space) != "model":
        return 2 * s["chunk"]
    head = pairs * shape.hidden * 4  # one head's writes, bytes
    per = max(1, int(WORKING_MB * 2**20 // max(head, 1)))
    w = min(shape.heads, per) * head / GIB
    return max(3 * w, 2 * w + s["chunk"])


def estimate_gib(shape: Shape, pairs: int, path: str, compute_space: str) -> float:
    """Peak (VmHWM: anonymous and file-mapped pages) of a measurement: 0.5 GiB of process, U's float32 scan columns,
    and the largest of what the phases hold besides them.

    Streamed (each tensor maps its shard for that read only, so mapped pages leave with the tensor): building the
    scan columns, the LM head's bf16 pages; block 0's MLP, one projection in float32 with its bf16 pages; a layer, its
    v and o in float32 with their bf16 pages and the engine's working set.
    In memory: every weight in float32; while loading, one layer more (its float32 and bf16 copies, as the in-memory
    runs of the v32k checkpoint showed: about 4.3 GiB over the loaded weights) instead of the scan columns; then the
    scan columns and the working set."""
    s = sizes_gib(shape, pairs)
    work = working_gib(shape, pairs, compute_space)
    if path == "in-memory":
        return PROCESS_GIB + s["all"] + max(1.5 * s["layer"], s["U"] + work)
    return PROCESS_GIB + s["U"] + max(s["U"] / 2, 1.5 * s["mlp_proj"], 1.5 * s["v_o"] + work)


def maps_utils_state(root: Path) -> tuple[str | None, list[str]]:
    """(HEAD commit, or the exported copy's; uncommitted files under maps_utils/ of the tree measured)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "maps_utils"], cwd=root, capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):  # not a repository: an exported copy (git archive)
        commit = _source_commit()
        return (f"{commit} (exported copy)" if commit else None), []
    return head.stdout.strip(), [line[3:] for line in dirty.stdout.splitlines() if line.strip()]


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def drop_page_cache(folder: Path) -> None:
    """Evict the checkpoint's files from the page cache (clean pages of our own files; nothing else is touched)."""
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---- one measurement, in a fresh process ---------------------------------------------------------------------------
def _status_kib(*keys: str) -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in keys:
            out[name] = int(value.split()[0])
    return out


def _phase(name: str, seconds: float) -> int:
    """Log a finished phase (the log says how far a killed measurement got); returns VmHWM in KiB."""
    got = _status_kib("VmHWM", "RssAnon", "RssFile")
    print(f"{name}: {seconds:.1f} s, VmHWM {got['VmHWM'] / 2**20:.2f} GiB, RssAnon {got['RssAnon'] / 2**20:.2f} GiB, "
          f"RssFile {got['RssFile'] / 2**20:.2f} GiB", flush=True)
    return got["VmHWM"]


class RssSampler(threading.Thread):
    """Samples RssAnon and RssFile every 50 ms (VmHWM gives only their sum's peak)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.05):
            for k, v in _status_kib("RssAnon", "RssFile").items():
                self.peak[k] = max(self.peak[k], v)


def measure(spec: dict) -> dict:
    """Load ``spec["path"]`` one way and time the static engine on it (see the module docstring)."""
    import torch

    with open("/proc/self/oom_score_adj", "w") as f:  # if memory runs out after all, the kernel ends this first
        f.write("1000")
    torch.set_num_threads(spec["threads"])
    sampler = RssSampler()
    sampler.start()
    hwm = {}
    t_start = time.perf_counter()

    import maps_utils
    from maps_utils import relations as R
    from maps_utils.static import ranks as S
    from maps_utils.static.sources import SourceVectors

    kw = {}
    if "stream" in inspect.signature(maps_utils.load).parameters:
        kw["stream"] = spec["stream"]
    elif spec["stream"]:
        return {"error": "maps_utils.load has no stream= argument yet"}
    cuda = spec["device"].startswith("cuda")
    from maps_utils.models.weights import weights_sha256

    t0 = time.perf_counter()
    weights_sha256("dir", spec["path"])  # ~0 s: the parent hashed them, unless the file-hash index lost the entries
    rehash_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = maps_utils.load(spec["path"], device=spec["device"], dtype="float32", **kw)
    load_s = time.perf_counter() - t0
    weights = loaded.weights
    hwm["load"] = _phase("load", load_s)

    # random relations of random words, through the tokenizer filter the study uses
    g = torch.Generator().manual_seed(spec["seed"])
    src, tgt, usable = [], [], 0
    for r in range(spec["relations"]):
        ids = torch.randint(0, weights.vocab_size, (2, spec["pairs"]), generator=g).tolist()
        rel = R.Relation(f"random_{r}", tuple((f"w{s}", f"w{t}") for s, t in zip(*ids, strict=True)))
        tok = R.filter_single_token(rel, loaded.tokenizer)
        usable += len(tok)
        src += tok.source_ids
        tgt += tok.target_ids
    layers = spec["layers"] or list(range(1, weights.n_layers))
    f32 = torch.float32

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    columns = S.scan_columns(weights, f32)
    sync()
    columns_s = time.perf_counter() - t0
    hwm["columns"] = _phase("columns", columns_s)
    t0 = time.perf_counter()
    x = SourceVectors(weights, torch.as_tensor(src, device=weights.device), "first_mlp", layers=layers,
                      dtype=f32).layer(layers[0])
    sync()
    sources_s = time.perf_counter() - t0
    del x
    hwm["sources"] = _phase("sources", sources_s)

    # target_ranks builds its own sources in its first layer: the time spent in block 0's MLP is taken out of it
    in_mlp0, stamps = [0.0], []
    first_mlp = weights.first_mlp

    def timed_first_mlp(x):
        t = time.perf_counter()
        out = first_mlp(x)
        sync()
        in_mlp0[0] += time.perf_counter() - t
        return out

    weights.first_mlp = timed_first_mlp  # this object only; the library is unchanged

    def on_layer(layer, result):
        sync()
        stamps.append((layer, time.perf_counter(), in_mlp0[0], time.process_time()))
        _phase(f"layer {layer}", stamps[-1][1] - (stamps[-2][1] if len(stamps) > 1 else t0))

    t0, c0 = time.perf_counter(), time.process_time()
    result = S.target_ranks(weights, src, tgt, representation="first_mlp", layers=layers, progress=False, dtype=f32,
                            memory_budget_mb=WORKING_MB, compute_space=spec["compute_space"], on_layer=on_layer)
    ranks_s = time.perf_counter() - t0
    hwm["ranks"] = _phase("ranks", ranks_s)
    sampler.stop.set()
    sampler.join()
    before = [(None, t0, 0.0, c0), *stamps[:-1]]
    intervals = [b[1] - a[1] for a, b in zip(before, stamps, strict=True)]
    net = [(b[1] - a[1]) - (b[2] - a[2]) for a, b in zip(before, stamps, strict=True)]  # without block 0's MLP
    per_layer = sum(net) / len(net)
    cpu = [b[3] - a[3] for a, b in zip(before, stamps, strict=True)]  # CPU seconds of the process per layer
    digest = hashlib.sha256()
    for t in (result.top[layers], result.bottom[layers]):
        digest.update(t.contiguous().numpy().tobytes())
    cached = getattr(weights, "_scan_columns", None)
    return {
        "streamed_weights": bool(getattr(weights, "streamed", False)), "rehash_s": rehash_s, "load_s": load_s,
        "columns_s": columns_s,
        "sources_s": sources_s, "ranks_s": ranks_s, "layers_timed": layers,
        "layer_s": [round(v, 3) for v in intervals], "layer_net_s": [round(v, 3) for v in net],
        "mlp0_in_ranks_s": in_mlp0[0], "per_layer_s": per_layer, "layer_cpu_s": [round(v, 3) for v in cpu],
        "cpu_s": time.process_time(),  # with wall_s: how much of the run the process had a core (a shared machine)
        "columns_reused": cached is not None and cached[1] is columns,
        "space": S.pick_space(spec["compute_space"], weights.d_model, weights.d_head, len(src)),
        "pairs": len(src), "pairs_drawn": spec["relations"] * spec["pairs"], "usable_pairs": usable,
        "score_at_10": float((result.top[layers] < 10).float().mean()), "ranks_sha256": digest.hexdigest()[:16],
        "peak_rss_gib": _status_kib("VmHWM")["VmHWM"] / 2**20,
        "peak_anon_gib": sampler.peak["RssAnon"] / 2**20, "peak_file_gib": sampler.peak["RssFile"] / 2**20,
        "hwm_gib": {k: round(v / 2**20, 2) for k, v in hwm.items()},
        "cuda_peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "threads": torch.get_num_threads(), "wall_s": time.perf_counter() - t_start, "maps_utils": maps_utils.__file__,
    }


def run_child(spec: dict, log: Path, min_free_gib: float, timeout_s: float) -> dict:
    """``measure(spec)`` in a fresh python, watched: killed when MemAvailable < min_free_gib or after timeout_s."""
    result_file = log.with_suffix(".json")
    result_file.unlink(missing_ok=True)
    threads = str(spec["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, __file__, "--child", json.dumps(spec), "--result-file", str(result_file)]
    t0, lowest, why = time.perf_counter(), float("inf"), None
    with open(log, "w") as out:
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        while child.poll() is None:
            free = mem_available_gib()
            lowest = min(lowest, free)
            if free < min_free_gib:
                why = f"killed: MemAvailable fell to {free:.1f} GiB"
            elif time.perf_counter() - t0 > timeout_s:
                why = f"killed: over {timeout_s / 60:.0f} min"
            if why:
                child.kill()
                child.wait()
                break
            time.sleep(0.2)
    wall = time.perf_counter() - t0
    if why is None and child.returncode == 0 and result_file.is_file():
        got = json.loads(result_file.read_text())
    else:
        tail = log.read_text().strip().splitlines()[-3:] if log.is_file() else []
        got = {"error": why or (tail[-1] if tail else f"exit {child.returncode}"), "log_tail": " | ".join(tail)}
    return {**got, "child_wall_s": wall, "min_mem_available_gib": lowest}


# ---- the table -----------------------------------------------------------------------------------------------
def _fmt(v, digits=2):
    return "" if v is None or v != v else f"{v:.{digits}f}"


def markdown(rows: list[dict], device: str) -> str:
    head = ["shape", "path", "space", "peak RSS GiB (sampled peak anon, file)", "estimate GiB", "bound GiB",
            "load / columns / sources s", "s/layer", "full depth min", "streamed / in-memory"]
    if device.startswith("cuda"):
        head.insert(4, "peak CUDA GiB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("error"):
            cells = [r["shape"], r["path"], r.get("space", ""), r["error"], _fmt(r.get("estimate_gib"), 1),
                     _fmt(r.get("bound_gib")), "", "", "", ""]
        else:
            cells = [r["shape"], r["path"], r.get("space", ""),
                     f"{_fmt(r['peak_rss_gib'])} ({_fmt(r['peak_anon_gib'])}, {_fmt(r['peak_file_gib'])})",
                     _fmt(r.get("estimate_gib"), 1), _fmt(r["bound_gib"]),
                     f"{_fmt(r['load_s'], 1)} / {_fmt(r['columns_s'], 1)} / {_fmt(r['sources_s'], 1)}",
                     _fmt(r["per_layer_s"], 1), f"{_fmt(r['full_min'], 1)} ({r['full_layers']} layers)",
                     _fmt(r.get("ratio"))]
        if device.startswith("cuda"):
            cells.insert(4, _fmt(r.get("cuda_peak_gib")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="70b,405b,70b-small,70b-v32k",
                        help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--paths", default="streamed,in-memory", help="comma-separated, of streamed, in-memory")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", default=None, help="layers to time, comma-separated (default every layer but 0)")
    parser.add_argument("--relations", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (measurements and generation)")
    parser.add_argument("--compute-space", default="auto", choices=["auto", "head", "model"],
                        help="the rank engine's compute space (speed and memory only; the ranks are identical)")
    parser.add_argument("--ckpt-dir", default="/work/bench-ckpt")
    parser.add_argument("--shard-gib", type=float, default=4.0, help="largest shard written")
    parser.add_argument("--skip-generate", action="store_true", help="only measure checkpoints already there")
    parser.add_argument("--generate-only", action="store_true")
    parser.add_argument("--max-gib", type=float, default=18.0,
                        help="largest estimated peak (host memory) of a measurement that is run")
    parser.add_argument("--min-free-gib", type=float, default=1.5, help="kill a measurement below this MemAvailable")
    parser.add_argument("--timeout-min", type=float, default=60.0, help="per measurement")
    parser.add_argument("--warm-cache", action="store_true", help="keep the checkpoint in the page cache")
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--tag", default="", help="added to the result files' names")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        Path(args.result_file).write_text(json.dumps(measure(json.loads(args.child))))
        return

    import torch

    torch.set_num_threads(args.threads)  # the generation too: the machine may be shared
    t_all = time.perf_counter()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if bad := [s for s in shapes if s not in SHAPES] + [p for p in paths if p not in PATHS]:
        raise SystemExit(f"Unknown shape or path {', '.join(bad)}; shapes: {', '.join(SHAPES)}; paths: "
                         f"{', '.join(PATHS)}.")
    timed = [int(v) for v in args.layers.split(",")] if args.layers else None
    device = args.device.split(":")[0]
    stem = "-".join(["stream", device] + ([args.compute_space] if args.compute_space != "auto" else [])
                    + ([args.tag] if args.tag else []))
    ckpt = Path(args.ckpt_dir).expanduser()
    ckpt.mkdir(parents=True, exist_ok=True)
    out = ROOT / args.out
    logs = out / "stream-logs"
    logs.mkdir(parents=True, exist_ok=True)
    generated = {}
    # shards are linked from an earlier checkpoint of the same widths: the full-vocabulary ones first
    for name in sorted(shapes, key=lambda s: (SHAPES[s].vocab != 128256, -SHAPES[s].layers)):
        folder = ckpt / name
        if checkpoint_ready(folder, SHAPES[name], args.shard_gib):
            print(f"{name}: reusing {folder}", flush=True)
            generated[name] = "reused"
        elif args.skip_generate:
            raise SystemExit(f"{folder} holds no complete {name} checkpoint; run without --skip-generate.")
        else:
            print(f"{name}: generating {folder} (disk free {shutil.disk_usage(ckpt.parent).free / GIB:.0f} GiB)",
                  flush=True)
            rec = generate(folder, SHAPES[name], args.shard_gib, [d for d in ckpt.iterdir() if d.is_dir()])
            generated[name] = f"{rec['written']} shards written, {rec['linked']} linked, {rec['seconds']} s"
            print(f"{name}: {generated[name]}", flush=True)
    if args.generate_only:
        return

    from maps_utils.models.weights import weights_sha256

    rows = []
    for name in shapes:
        shape, folder = SHAPES[name], ckpt / name
        bound = bound_gib(shape, args.relations * args.pairs)
        t0 = time.perf_counter()
        weights_sha256("dir", folder)  # load() hashes the weight files once (file-hash index): not in its time here
        hashed = time.perf_counter() - t0
        print(f"{name}: weights hashed in {hashed:.1f} s (0 if the file-hash index had them)", flush=True)
        results = {}
        for path in paths:
            row = {"shape": name, "path": path, "bound_gib": bound, "full_layers": shape.full_layers, "hash_s": hashed,
                   "checkpoint_gib": sum(f.stat().st_size for f in folder.glob("*.safetensors")) / GIB}
            n = args.relations * args.pairs
            need = estimate_gib(shape, n, path, args.compute_space)
            row.update(estimate_gib=need, space=space_of(shape, n, args.compute_space))
            free = mem_available_gib()
            if need > args.max_gib:
                row["error"] = f"does not fit: needs ~{need:.0f} GiB (limit {args.max_gib:.0f})"
            elif need > free - args.min_free_gib:
                row["error"] = f"does not fit now: needs ~{need:.0f} GiB, {free:.0f} GiB available"
            else:
                if not args.warm_cache:
                    drop_page_cache(folder)
                spec = {"path": str(folder), "stream": path == "streamed", "device": args.device, "layers": timed,
                        "relations": args.relations, "pairs": args.pairs, "seed": args.seed, "threads": args.threads,
                        "compute_space": args.compute_space}
                print(f"{name} {path}: measuring (load average {os.getloadavg()[0]:.1f}, "
                      f"{free:.1f} GiB available)", flush=True)
                row["load_avg_before"] = os.getloadavg()[0]
                row["source"], dirty = maps_utils_state(ROOT)
                row["source_dirty"] = " ".join(dirty)
                row.update(run_child(spec, logs / f"{name}-{path}-{stem}.log", args.min_free_gib, args.timeout_min * 60))
                row["load_avg_after"] = os.getloadavg()[0]
            if not row.get("error"):
                row["full_min"] = (row["load_s"] + row["columns_s"] + row["sources_s"]
                                   + row["per_layer_s"] * shape.full_layers) / 60
                row["within_bound"] = row["peak_rss_gib"] <= bound if path == "streamed" else None
            results[path] = row
            print(json.dumps({k: v for k, v in row.items() if k != "bound_gib"}, default=str), flush=True)
        s, m = results.get("streamed"), results.get("in-memory")
        if s and m and not s.get("error") and not m.get("error"):
            s["ratio"] = s["per_layer_s"] / m["per_layer_s"]
            s["same_ranks"] = s["ranks_sha256"] == m["ranks_sha256"]
        rows += list(results.values())
        write_csv(rows, out / f"{stem}.csv")  # after every shape: a run stopped later keeps the rows it has

    import maps_utils
    from maps_utils.core.manifest import build_manifest, git_commit, write_manifest

    manifest = build_manifest(parameters={**{k: v for k, v in vars(args).items() if k not in ("child", "result_file")},
                                          "shapes_used": {n: dataclasses.asdict(SHAPES[n]) for n in shapes},
                                          "checkpoints": generated, "representation": "first_mlp",
                                          "dtype": "float32 from bf16", "working_chunk_mb": WORKING_MB},
                              wall_seconds=time.perf_counter() - t_all)
    manifest.update(cpu=platform.processor() or _cpu_name(), cpu_count=os.cpu_count(),
                    mem_total_gib=round(_mem_total_gib(), 1), threads=args.threads)
    manifest["maps_utils"] = {"file": maps_utils.__file__, "commit": git_commit(ROOT) or _source_commit()}
    write_manifest(out / f"{stem}.manifest.json", manifest, files=[out / f"{stem}.csv"])
    print()
    print(markdown(rows, args.device))
    print(f"\nwall {time.perf_counter() - t_all:.0f} s; {out / f'{stem}.csv'}")


def write_csv(rows: list[dict], path: Path) -> None:
    import pandas as pd

    table = pd.DataFrame(rows)
    for col in ("layer_s", "layer_net_s", "layer_cpu_s", "layers_timed", "hwm_gib"):
        if col in table:
            table[col] = table[col].map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
    table.round(4).to_csv(path, index=False)


def _source_commit() -> str | None:
    """The commit an exported copy of the repository (git archive) was made from, where it says so."""
    marker = ROOT / ".source-commit"
    return marker.read_text().strip() if marker.is_file() else None


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


if __name__ == "__main__":
    main()
