"""Models past one device (``load(device_map=...)``, accelerate's big-model inference): a tiny checkpoint with half
its layers (and its LM head) offloaded to disk gives the single-device run's static and dynamic scores, ablation
curves, real attention and QK joint prediction, bit for bit, on CPU; the bad options are one sentence each. The last test runs the
steps with layers on two execution devices (a GPU and the CPU) and needs CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from maps_utils import HeadWeights, LoadedModel, load
from maps_utils import relations as R
from maps_utils.ablation import experiment as A
from maps_utils.ablation import passes as AP
from maps_utils.cli import main
from maps_utils.core.errors import OptionError
from maps_utils.core.store import RunOptions
from maps_utils.dynamic import capture as CA
from maps_utils.dynamic import fidelity as FI
from maps_utils.dynamic import scores as DY
from maps_utils.models import device_map as DM
from maps_utils.models.loading import check_options
from maps_utils.qk import QKOptions
from maps_utils.qk import inference as QI
from maps_utils.static import scores as SC
from maps_utils.static import sources
from maps_utils.static.ranks import scan_columns, target_ranks

from ..conftest import make_tiny, word_tokenizer

QUIET = dict(results_dir=None, progress=False)


def half_on_disk(model: torch.nn.Module) -> dict[str, str]:
    """A device map of ``model``: the second half of its blocks (and an untied LM head) on disk, every other module in
    CPU memory."""
    w = HeadWeights(model)
    names = {m: n for n, m in model.named_modules()}
    disk = {names[w.block(i)] for i in range(w.n_layers // 2, w.n_layers)}
    if w.spec.unembed(model).weight is not w.spec.embed(model).weight:
        disk.add(names[w.spec.unembed(model)])
    out: dict[str, str] = {}

    def visit(prefix: str, module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            full = prefix + name
            if full in disk:
                out[full] = "disk"
            elif any(d.startswith(full + ".") for d in disk):
                visit(full + ".", child)
            else:
                out[full] = "cpu"

    visit("", model)
    return out


def save(model: torch.nn.Module, folder):
    model.to(torch.float32).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def copying_model() -> torch.nn.Module:
    """4 layers, untied, small random weights: relations it partly gets right, so curves and ranks move."""
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=16, intermediate_size=32, vocab_size=101, tie_word_embeddings=False,
                                   bos_token_id=3)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(the single-device model, the same checkpoint with layers 2-3 and the LM head on disk)."""
    model = copying_model()
    folder = save(model, tmp_path_factory.mktemp("ckpt"))
    one = load(str(folder), device="cpu", stream=False)
    half = load(str(folder), device_map=half_on_disk(model))
    return one, half


RELATIONS = [R.Relation(name, tuple((f"t{j}", f"t{f(j)}") for j in range(40)), category="algorithmic",
                        copying=name == "copy", causal_template=f"t9{i} t8{i} <X> t99")
             for i, (name, f) in enumerate([("copy", lambda j: j), ("shift", lambda j: (j + 1) % 100)])]


def test_half_the_layers_are_on_disk_and_read_through_their_hooks(pair):
    one, half = pair
    assert half.info["device_map"]["model.layers.3"] == "disk" and half.info["device_map"]["lm_head"] == "disk"
    assert half.device == torch.device("cpu") and half.weights.input_device == torch.device("cpu")
    assert half.weights.streamed and not one.weights.streamed
    attn = half.weights.attn_module(3)
    assert all(p.is_meta for p in attn.parameters())
    for layer in range(4):
        for read in ("W_V_kv", "W_O", "W_Q", "W_K_kv"):
            assert torch.equal(getattr(half.weights, read)(layer), getattr(one.weights, read)(layer)), (read, layer)
    assert all(p.is_meta for p in attn.parameters())  # loaded for the read, dropped again; the tensors stay valid
    assert torch.equal(half.weights.U, one.weights.U) and torch.equal(half.weights.E, one.weights.E)
    ids = torch.tensor([[3, 5, 9, 17, 40]])
    with torch.inference_mode():
        assert torch.equal(half.model(input_ids=ids).logits, one.model(input_ids=ids).logits)


def test_static_scores_and_context_free_vectors_are_identical(pair):
    one, half = pair
    src, tgt = list(range(0, 100, 3)), list(range(1, 101, 3))
    for representation in ("first_mlp", "context_free", "raw_mlp+centre+norm"):
        a = target_ranks(one.weights, src, tgt, representation=representation, rank_cap=101, progress=False)
        b = target_ranks(half.weights, src, tgt, representation=representation, rank_cap=101, progress=False)
        assert torch.equal(a.top, b.top) and torch.equal(a.bottom, b.bottom), representation
    assert torch.equal(sources.residuals(one.weights, src, (3,), 3), sources.residuals(half.weights, src, (3,), 3))
    pd.testing.assert_frame_equal(SC.static_scores(one, RELATIONS, run=RunOptions(**QUIET)).table(),
                                  SC.static_scores(half, RELATIONS, run=RunOptions(**QUIET)).table())


def test_dynamic_scores_are_identical(pair):
    one, half = pair
    a, b = (DY.dynamic_scores(lm, RELATIONS, max_pairs=30, run=RunOptions(**QUIET)) for lm in pair)
    pd.testing.assert_frame_equal(a.table(), b.table())
    assert a.table().score.gt(0).any()  # something to compare: some head writes some target in its top k
    prompts = CA.build_prompts(one.tokenizer, "t1 t2 <X> t3", [[i] for i in range(5, 45)], space_in_source=False)
    ranks = [CA.prompt_ranks(lm.model, lm.weights, prompts, list(range(45, 85)), batch_size=16, rank_cap=101,
                             progress=False) for lm in pair]
    assert torch.equal(*ranks)
    ids, _, source = CA.pad_batch(prompts, 0, "cpu")  # the fidelity profile's real source vectors
    assert torch.equal(*[FI.real_sources(lm.model, lm.weights, ids, source) for lm in pair])


def test_ablation_curves_and_logits_are_identical(pair):
    one, half = pair
    static = SC.static_scores(one, RELATIONS, run=RunOptions(**QUIET))
    kw = dict(n_random=1, min_base=0.0, max_base_gap=1.0, max_overlap=1.0, max_heads=4, max_pairs=20,
              run=RunOptions(seed=1, **QUIET))
    a, b = (A.causal_experiment(lm, static, RELATIONS, **kw) for lm in pair)
    for name in ("tasks", "head_table", "controls", "curves"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name))
    task, _ = AP.build_task(RELATIONS[1], one.tokenizer)
    heads = [(3, 1), (0, 2), (2, 0), (3, 3), (1, 1), (2, 2)]
    for kind in (None, AP.mean_last_z(one, task)):
        assert torch.equal(AP.last_token_logits(one, task, heads, replacement=kind),
                           AP.last_token_logits(half, task, heads, replacement=kind))
    # targets the clean model gets right, so removing heads moves the curve; each step restarts at its first ablated
    # layer under the device map too (the blocks below replay the clean step)
    task.targets = AP.last_token_logits(one, task).argmax(-1).tolist()
    tallies = [{}, {}]
    curves = [AP.run_curves(lm, task, [heads], tally=t)[1][0] for lm, t in zip(pair, tallies, strict=True)]
    np.testing.assert_array_equal(*curves)
    assert curves[0][0] == 1.0 and curves[0][-1] < 1.0, curves[0]
    assert tallies[0] == tallies[1] and tallies[1]["skipped"] > 0
    assert all(AP._accelerate_forward(b) for b in half.weights._blocks)  # each block's hook is put back


def test_qk_attention_and_joint_prediction_are_identical(pair):
    one, half = pair
    prompts = CA.build_prompts(one.tokenizer, "t1 t2 <X> t3 t4", [[i] for i in range(5, 25)], space_in_source=False)
    ids, last, _ = CA.pad_batch(prompts, 0, "cpu")
    assert torch.equal(QI.real_attention(one.model, one.weights, ids, last),
                       QI.real_attention(half.model, half.weights, ids, last))
    a, b = (QI.run_prompts(lm, QI.QKMap(lm.weights, QKOptions(offsets=(1, 2))), prompts, list(range(30, 50)),
                           ov_representation="first_mlp", columns=scan_columns(lm.weights), rank_cap=101,
                           batch_size=8) for lm in pair)
    assert a.keys() == b.keys() and {"top1", "spearman", "joint_rank", "oracle_rank"} <= a.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("key", ["gemma3-gqa", "gpt2", "gpt_neox-parallel", "olmo2-gqa"])
def test_other_families_give_identical_steps_with_half_their_layers_on_disk(key, tmp_path):
    """Per family: norms on the QK side, sandwich norms, a fused Conv1D, learned positions, a tied LM head."""
    model = make_tiny(key)
    folder = save(model, tmp_path / key)
    one, half = load(str(folder), device="cpu", stream=False), load(str(folder), device_map=half_on_disk(model))
    assert any(v == "disk" for v in half.info["device_map"].values())
    prompts = CA.build_prompts(one.tokenizer, "t1 t2 <X> t3", [[i] for i in range(5, 17)], space_in_source=False)
    ids, last, _ = CA.pad_batch(prompts, 0, "cpu")
    runs = []
    for lm in (one, half):
        task = AP.Task("t", None, "<X>", [("a", "b")] * len(prompts), [list(p.ids) for p in prompts], list(range(12)))
        runs.append((CA.prompt_ranks(lm.model, lm.weights, prompts, list(range(20, 32)), rank_cap=101, progress=False),
                     QI.real_attention(lm.model, lm.weights, ids, last),
                     AP.last_token_logits(lm, task, [(1, 0), (1, 3)]),
                     target_ranks(lm.weights, range(40), range(40, 80), representation="context_free", rank_cap=101,
                                  progress=False).top,
                     QI.static_batch(QI.QKMap(lm.weights, QKOptions()), ids, last, "first_mlp")[0]))
    for x, y in zip(*runs, strict=True):
        assert torch.equal(x, y)


def test_an_unlisted_architecture_passes_the_generic_parity_checks_with_half_its_layers_on_disk(tmp_path):
    """The generic adapter's parity checks (run when HeadWeights first reads an unlisted model) read offloaded
    layers through their hooks: the dispatched model is accepted and reads as the whole one."""
    from accelerate import dispatch_model

    whole, model = make_tiny("qwen2-gqa"), make_tiny("qwen2-gqa")  # Llama-like, with biases on q, k and v
    device_map = half_on_disk(make_tiny("qwen2-gqa"))  # (HeadWeights checks a generic model once: not these two)
    model.config.model_type = whole.config.model_type = "my_qwen"  # an architecture the table does not list
    dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path / "offload"))
    assert model.model.layers[1].self_attn.o_proj.weight.is_meta
    weights, reference = HeadWeights(model), HeadWeights(whole)
    assert weights.family == reference.family == "generic"
    for read in ("W_V_kv", "W_O", "W_Q", "W_K_kv", "b_V"):
        assert torch.equal(getattr(weights, read)(1), getattr(reference, read)(1)), read
    assert torch.equal(weights.first_mlp(weights.E[:7]), reference.first_mlp(reference.E[:7]))


# ---- bad options: one sentence each, before anything is loaded -----------------------------------------
def _sentence(err: pytest.ExceptionInfo) -> str:
    return _sentence_text(str(err.value))


def _sentence_text(text: str) -> str:
    text = text.strip()
    assert "\n" not in text and text.endswith(".") and "Traceback" not in text, text
    return text


@pytest.mark.parametrize("device_map, says", [
    ({"": "cuda:3"}, "'cuda:3', which does not exist"),
    ({"model.embed_tokens": "cpu", "model.layers": 7, "model.norm": "cpu", "lm_head": "cpu"}, "'7', which does not"),
    ({"": "tpu"}, "'tpu', which is not a device"),
    ("everywhere", "Unknown device_map 'everywhere'"),
    ("{not json", "Unknown device_map"),
])
def test_a_device_that_does_not_exist_is_one_sentence_naming_the_fix(device_map, says, tmp_path):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has the devices named")
    folder = save(make_tiny("llama-gqa"), tmp_path / "ckpt")
    with pytest.raises(OptionError) as err:
        load(str(folder), device_map=device_map)
    text = _sentence(err)
    assert says in text and ("device_map auto" in text or "use auto" in text), text
    with pytest.raises(OptionError):
        check_options(str(folder), device_map=device_map)


def test_a_map_of_modules_the_model_lacks_or_leaves_out_is_one_sentence(tmp_path):
    model = make_tiny("llama-gqa")
    folder = save(model, tmp_path / "ckpt")
    typo = {**half_on_disk(model), "model.layer.9": "cpu"}
    with pytest.raises(OptionError) as err:
        load(str(folder), device_map=typo)
    assert "names 'model.layer.9', which LlamaForCausalLM does not have" in _sentence(err)
    partial = {k: v for k, v in half_on_disk(model).items() if k != "lm_head"}
    with pytest.raises(OptionError) as err:
        load(str(folder), device_map=partial)
    assert "gives no device to lm_head.weight" in _sentence(err)


@pytest.mark.parametrize("kwargs, says", [
    (dict(device_map="auto", max_memory="cpu:lots"), "max_memory gives cpu the size 'lots'"),
    (dict(device_map="auto", max_memory="9:1GiB"), "'9', which does not exist"),
    (dict(device_map="auto", max_memory="70GiB"), "not device:size"),
    (dict(max_memory="cpu:1GiB"), "only apply with a device_map"),
    (dict(device_map="auto", device="cpu"), "leave device at auto"),
    (dict(device_map="auto", stream=True), "pass one of them"),
])
def test_bad_placement_options_are_one_sentence(kwargs, says):
    with pytest.raises(OptionError) as err:
        check_options("smollm2-135m", **kwargs)
    assert says in _sentence(err)


def test_the_maps_command_takes_a_device_map(pair, tmp_path, capsys):
    one, _ = pair
    folder, disk = one.source, json.dumps(half_on_disk(one.model))
    rel = tmp_path / "shift.json"
    rel.write_text(json.dumps([[f"t{j}", f"t{(j + 1) % 100}"] for j in range(40)]))
    tables = []
    for extra, out in (([], "one"), (["--device-map", disk], "half")):
        assert main(["score", folder, "--relation", str(rel), "--results-dir", str(tmp_path / out), *extra]) == 0
        tables.append(capsys.readouterr().out.split("\n\nscores")[0])
    assert tables[0] == tables[1] and "shift" in tables[0]
    assert main(["check-options", folder, "--device-map", '{"": "cuda:7"}']) == 2
    assert "'cuda:7', which does not exist" in _sentence_text(capsys.readouterr().err.removeprefix("error: "))


def test_options_from_the_shell():
    assert DM.parse_device_map("") is None and DM.parse_device_map("auto") == "auto"
    assert DM.parse_device_map('{"model.layers.0": 0, "lm_head": "cpu"}') == {"model.layers.0": 0, "lm_head": "cpu"}
    assert DM.parse_max_memory("0:70GiB, 1:70GiB,cpu:200GiB") == {"0": "70GiB", "1": "70GiB", "cpu": "200GiB"}
    assert DM.check_placement("balanced", "cpu:2GiB,disk:100000") == {
        "device_map": "balanced", "max_memory": {"cpu": "2GiB", "disk": 100000}}
    assert DM.check_placement({"a": "cpu", "b": "disk", "c": "cpu:0"}, offload_folder="~/off") == {
        "device_map": {"a": "cpu", "b": "disk", "c": "cpu"}, "offload_folder": str(Path("~/off").expanduser())}
    assert DM.check_placement(None) is None and DM.check_placement("none", "") is None


def test_auto_within_max_memory_offloads_to_disk_and_gives_the_same_logits(tmp_path):
    """The strategy path: accelerate infers the map within max_memory and sends what does not fit to disk."""
    model = make_tiny("llama-mha-untied")
    folder = save(model, tmp_path / "ckpt")
    one = load(str(folder), device="cpu", stream=False)
    budget = sum(p.numel() for p in model.parameters()) * 4 // 2  # half the weights' bytes in float32
    half = load(str(folder), device_map="auto", max_memory=f"cpu:{budget}", offload_folder=tmp_path / "offload")
    placed = set(half.info["device_map"].values())
    assert "disk" in placed, half.info["device_map"]
    ids = torch.tensor([[1, 5, 9, 17, 40, 2]])
    with torch.inference_mode():
        assert torch.equal(half.model(input_ids=ids).logits, one.model(input_ids=ids).logits)
    assert half.manifest()["device_map"] == half.info["device_map"]


def test_a_checkpoint_that_cannot_serve_its_offload_needs_a_folder_said_in_one_sentence(tmp_path):
    """A .bin checkpoint's disk-mapped weights are written out again: without offload_folder one sentence, with it
    the single-device logits."""
    model = make_tiny("llama-gqa").to(torch.float32)
    folder = tmp_path / "bin"
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    word_tokenizer().save_pretrained(folder)
    with pytest.raises(OptionError) as err:
        load(str(folder), device_map=half_on_disk(model))
    assert "pass an offload_folder" in _sentence(err)
    half = load(str(folder), device_map=half_on_disk(model), offload_folder=tmp_path / "offload")
    assert any((tmp_path / "offload").iterdir())
    ids = torch.tensor([[1, 5, 9, 17, 40, 2]])
    with torch.inference_mode():
        assert torch.equal(half.model(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.embedded
def test_an_embedded_model_takes_a_device_map_from_its_converted_copy(smollm2, model_cache):
    w = smollm2.weights
    layers = {f"model.layers.{i}": "disk" if i >= w.n_layers // 2 else "cpu" for i in range(w.n_layers)}
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  **layers}  # the tied LM head too (transformers asks for every parameter's module)
    half = load("smollm2-135m", device_map=device_map, cache_dir=model_cache)
    assert half.from_cache and half.weights_sha256 == smollm2.weights_sha256
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(half.model(input_ids=ids).logits, smollm2.model(input_ids=ids).logits)


# ---- two execution devices ---------------------------------------------------------------------------------
def _spread(first, second) -> dict:
    return {"model.embed_tokens": first, "model.rotary_emb": first, "model.layers.0": first, "model.layers.1": first,
            "model.layers.2": second, "model.layers.3": second, "model.norm": second, "lm_head": second}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize("first, second", [(0, "cpu"), ("cpu", 0)], ids=["gpu-then-cpu", "cpu-then-gpu"])
def test_layers_on_a_gpu_and_the_cpu_give_the_steps_of_one_device(first, second):
    """accelerate runs half the blocks on cuda:0 and half on the CPU (``main_device="cpu"`` keeps "cpu" modules
    running there), so every step's hooks and weights cross devices. float64: the ranks are the CPU's."""
    from accelerate import dispatch_model

    tok = word_tokenizer()
    model = copying_model().to(torch.float64)
    ref = LoadedModel("tiny", model, tok, HeadWeights(model), torch.device("cpu"), torch.float64, "test", 0.0)
    spread = dispatch_model(copying_model().to(torch.float64), device_map=_spread(first, second), main_device="cpu")
    w = HeadWeights(spread)
    assert {w.device_of(w.block(0)).type, w.device_of(w.block(3)).type} == {"cpu", "cuda"}
    lm = LoadedModel("tiny", spread, tok, w, w.input_device, torch.float64, "test", 0.0)
    prompts = CA.build_prompts(tok, "t1 t2 <X> t3", [[i] for i in range(5, 25)], space_in_source=False)
    task = AP.Task("t", None, "<X>", [("a", "b")] * len(prompts), [list(p.ids) for p in prompts], list(range(20)))
    heads = [(2, 1), (0, 2), (3, 0)]
    ranks = [CA.prompt_ranks(x.model, x.weights, prompts, list(range(30, 50)), rank_cap=101, progress=False)
             for x in (ref, lm)]
    assert torch.equal(*ranks)
    att, static_qk = [], []
    for x in (ref, lm):
        ids, last, _ = CA.pad_batch(prompts, 0, x.weights.device)
        att.append(QI.real_attention(x.model, x.weights, ids, last).cpu())
        static_qk.append(QI.static_batch(QI.QKMap(x.weights, QKOptions()), ids, last, "first_mlp")[0].cpu())
    torch.testing.assert_close(*att)
    torch.testing.assert_close(*static_qk)
    torch.testing.assert_close(*[AP.last_token_logits(x, task, heads) for x in (ref, lm)])
    np.testing.assert_array_equal(*[AP.run_curves(x, task, [heads])[1][0] for x in (ref, lm)])
    for rep in ("first_mlp", "context_free"):
        a, b = (target_ranks(x.weights, range(40), range(40, 80), representation=rep, rank_cap=101, progress=False)
                for x in (ref, lm))
        assert torch.equal(a.top.cpu(), b.top.cpu()), rep
