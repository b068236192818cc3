"""hammer as an lm-eval model, lm-eval's perplexity in `hammer eval --mode rolling`, and lm-eval tasks
in `hammer eval --tasks` and during training: each the numbers of `lm_eval --model hf` on the HF export.

The tasks are local YAMLs over jsonl files written here, one of each output type; the model's context
is 112 tokens, so rolling windows and left-truncated contexts are exercised.
"""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from hammer.cli import main
from tests.conftest import REPO
from tests.eval_fixtures import TEXTS, write_model_dir

lm_eval = pytest.importorskip("lm_eval")
# The module's fixture runs lm-eval's hf model on four tasks (about 12 s); each test runs lm-eval again.
pytestmark = pytest.mark.slow

TASKS = ["t_rolling", "t_mc", "t_ll", "t_gen"]
LONG = [" ".join(TEXTS) * 3, "天地玄黄，宇宙洪荒。" * 30]  # several windows of 112 tokens each


def _task(name: str, data, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}")


def write_tasks(directory):
    """One local task per output type: rolling perplexity, multiple choice, loglikelihood, generation."""
    def jsonl(name, rows):
        (directory / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                     encoding="utf-8")
        return directory / name

    docs = jsonl("docs.jsonl", [{"text": t} for t in TEXTS + LONG])
    mc = jsonl("mc.jsonl", [
        {"question": "The quick brown fox", "choices": [" jumps over", " sleeps", "跳"], "label": 0},
        {"question": "def add(a, b):\n   ", "choices": [" return a + b", " print(a)"], "label": 0},
        {"question": "北京是中国的", "choices": ["首都", "城市"], "label": 0},
        {"question": LONG[0], "choices": [" end", " 结束"], "label": 1}])
    prompts = jsonl("prompts.jsonl", [
        {"prompt": "The quick brown", "answer": " fox"}, {"prompt": "天地玄黄，", "answer": "宇宙洪荒"},
        {"prompt": "for i in", "answer": " range(10)"}, {"prompt": LONG[1], "answer": "天地"}])
    (directory / "rolling.yaml").write_text(_task("t_rolling", docs, (
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
        "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")))
    (directory / "mc.yaml").write_text(_task("t_mc", mc, (
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')))
    (directory / "ll.yaml").write_text(_task("t_ll", prompts, (
        'output_type: loglikelihood\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n")))
    (directory / "gen.yaml").write_text(_task("t_gen", prompts, (
        'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n", "。"]\n  max_gen_toks: 12\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")))
    return directory


def write_generation_task(directory, generations):
    """t_gen_hf: t_gen's prompts with hf's generations as targets, so exact_match 1.0 says every
    generated text is hf's."""
    prompts = [json.loads(line) for line in (directory / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    data = directory / "generated.jsonl"
    data.write_text("".join(json.dumps({"prompt": p["prompt"], "answer": g}, ensure_ascii=False) + "\n"
                            for p, g in zip(prompts, generations, strict=True)), encoding="utf-8")
    gen = (directory / "gen.yaml").read_text(encoding="utf-8").split("\n", 1)[1]
    (directory / "gen_hf.yaml").write_text("task: t_gen_hf\n" + gen.replace(
        str(directory / "prompts.jsonl"), str(data)), encoding="utf-8")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model whose head never picks a byte-fallback piece, its HF export, the tasks, and
    lm-eval's hf results on the export.

    transformers decodes a run of byte pieces that is not valid UTF-8 to one U+FFFD per byte where
    SentencePiece keeps the valid ones, so generated text is compared on text pieces only.
    """
    import torch
    from transformers import LlamaForCausalLM

    from hammer.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("lmeval")
    src = write_model_dir(root / "src", seed=1)
    tok = Tokenizer.from_pretrained(src)
    model = LlamaForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.lm_head.weight[[i for i in range(tok.vocab_size) if tok.sp.is_byte(i)]] = 0.0
    model.save_pretrained(src)
    assert main(["convert", str(src), str(root / "hf"), "--to", "hf"]) == 0
    (root / "tasks").mkdir()
    tasks = write_tasks(root / "tasks")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        hf = run(model="hf", model_args={"pretrained": str(root / "hf"), "add_bos_token": False,
                                         "dtype": "float32"}, tasks=tasks)
        write_generation_task(tasks, [r[0] for r in responses(hf, "t_gen")])
        yield {"src": src, "hf_dir": root / "hf", "tasks": tasks, "hf": hf, "tokenizer": tok}


def run(*, tasks, names=TASKS, **kwargs):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks), include_defaults=False)  # lm-eval's own 15000: 15 s
    return lm_eval.simple_evaluate(tasks=list(names), task_manager=manager, log_samples=True, batch_size=4,
                                   device="cpu", **kwargs)


def responses(results, task):
    return [s["filtered_resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def assert_same_results(ours, theirs, rel, tasks=TASKS):
    for task in tasks:
        for (a, b) in zip(responses(ours, task), responses(theirs, task), strict=True):
            if task == "t_gen":
                assert a == b
            elif task == "t_rolling":
                assert a[0] == pytest.approx(b[0], rel=rel)
            else:
                assert [ll for ll, _ in a] == pytest.approx([ll for ll, _ in b], rel=rel)
                assert [g for _, g in a] == [g for _, g in b]
        for key, value in theirs["results"][task].items():
            if isinstance(value, float):
                assert ours["results"][task][key] == pytest.approx(value, rel=rel), (task, key)


def test_the_fixture_exercises_long_documents_and_real_generations(setup):
    tok = setup["tokenizer"]
    assert max(len(tok.encode(t, add_special_tokens=False)) for t in LONG) > 3 * 112
    texts = [r[0] for r in responses(setup["hf"], "t_gen")]
    assert all(texts) and not any("\ufffd" in t for t in texts)


def test_hammer_model_on_torch_gives_lm_eval_hf_numbers_for_every_output_type(setup):
    import hammer.lmeval  # noqa: F401  (registers "hammer")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        ours = run(model="hammer", model_args=f"pretrained={setup['src']},backend=torch", tasks=setup["tasks"])
    assert_same_results(ours, setup["hf"], rel=1e-4)
    # Per document, the rolling log-likelihoods (documents of several windows included) agree far closer.
    assert [r[0] for r in responses(ours, "t_rolling")] == pytest.approx(
        [r[0] for r in responses(setup["hf"], "t_rolling")], rel=1e-6)


def test_hammer_model_on_jax_gives_lm_eval_hf_numbers(setup):
    """Loglikelihood and rolling here; multiple choice and generation on JAX in the sharded test below."""
    import hammer.lmeval  # noqa: F401

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        ours = run(model="hammer", model_args={"pretrained": str(setup["src"]), "backend": "jax"},
                   tasks=setup["tasks"], names=["t_ll", "t_rolling"])
    assert_same_results(ours, setup["hf"], rel=1e-4, tasks=["t_ll", "t_rolling"])
    assert [r[0] for r in responses(ours, "t_rolling")] == pytest.approx(
        [r[0] for r in responses(setup["hf"], "t_rolling")], rel=1e-6)


def test_hammer_eval_rolling_reports_lm_eval_perplexities(setup, capsys):
    docs = setup["tasks"] / "docs.jsonl"
    capsys.readouterr()
    assert main(["eval", "--model", str(setup["src"]), "--backend", "torch", "--mode", "rolling", "--json",
                 "--data", f"docs={docs}"]) == 0
    report = json.loads(capsys.readouterr().out)["domains"]["docs"]
    theirs = setup["hf"]["results"]["t_rolling"]
    for metric in ("bits_per_byte", "byte_perplexity", "word_perplexity"):
        assert report[metric] == pytest.approx(theirs[f"{metric},none"], rel=1e-6)
    texts = TEXTS + LONG
    tok = setup["tokenizer"]
    assert report["documents"] == len(texts)
    assert report["tokens"] == sum(len(tok.encode(t, add_special_tokens=False)) for t in texts)
    assert report["bytes"] == sum(len(t.encode()) for t in texts)
    nll = -sum(r[0] for r in responses(setup["hf"], "t_rolling"))
    assert report["nll"] == pytest.approx(nll, rel=1e-6)
    assert report["loss"] == pytest.approx(nll / report["tokens"], rel=1e-6)


def test_rolling_differs_from_skywork_which_stays_the_default(setup, capsys):
    docs = setup["tasks"] / "docs.jsonl"
    reports = {}
    for mode in ([], ["--mode", "skywork"], ["--mode", "rolling"]):
        capsys.readouterr()
        assert main(["eval", "--model", str(setup["src"]), "--backend", "torch", "--json", *mode,
                     "--data", f"docs={docs}"]) == 0
        reports[" ".join(mode)] = json.loads(capsys.readouterr().out)["domains"]["docs"]
    assert reports[""] == reports["--mode skywork"]
    assert reports[""]["scored_tokens"] < reports["--mode rolling"]["tokens"]
    assert reports[""]["bits_per_byte"] != pytest.approx(reports["--mode rolling"]["bits_per_byte"], rel=1e-3)


def test_hammer_eval_tasks_runs_local_tasks_with_a_limit(setup, capsys):
    capsys.readouterr()
    assert main(["eval", "--model", str(setup["src"]), "--backend", "torch", "--json", "--tasks", "t_rolling",
                 "t_mc", "--include-path", str(setup["tasks"]), "--limit", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["results"]["t_rolling"]["sample_len"] == 2
    lls = [r[0] for r in responses(setup["hf"], "t_rolling")[:2]]
    n_bytes = sum(len(t.encode()) for t in TEXTS[:2])
    assert report["metrics"]["t_rolling/bits_per_byte"] == pytest.approx(-sum(lls) / n_bytes / math.log(2),
                                                                         rel=1e-6)
    assert set(report["metrics"]) == {"t_rolling/word_perplexity", "t_rolling/byte_perplexity",
                                      "t_rolling/bits_per_byte", "t_mc/acc", "t_mc/acc_norm"}


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "t_mc", "--data", "d=x.jsonl"], "argument --data: not allowed with argument --tasks"),
    (["--tasks", "t_mc", "--backend", "hf"], "--backend hf runs --mode skywork only"),
    (["--data", "d=x.jsonl", "--mode", "rolling", "--max-tokens", "64"], "--max-tokens applies to --mode skywork"),
    (["--data", "d=x.jsonl", "--limit", "3"], "--limit applies to --tasks only"),
])
def test_hammer_eval_refuses_options_that_do_not_go_together(setup, argv, message, capsys):
    capsys.readouterr()
    try:
        code = main(["eval", "--model", str(setup["src"]), *argv])
    except SystemExit as exit_:  # argparse's own refusals
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_downstream_metrics_score_a_live_twin_and_leave_the_global_generators_alone(setup):
    import random

    import torch

    import hammer_torch
    from hammer.tasks import downstream_metrics
    from hammer_torch.generate import TorchStepper
    from hammer_torch.scorer import TorchScorer

    model = hammer_torch.from_pretrained(setup["src"])
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state().clone())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        metrics = downstream_metrics(TorchScorer.from_twin(model), setup["tokenizer"], TASKS + ["t_gen_hf"],
                                     include_path=setup["tasks"],
                                     new_stepper=lambda n: TorchStepper(model, n))
        assert random.getstate() == before[0]
        assert (np.random.get_state()[1] == before[1]).all()
        assert torch.equal(torch.random.get_rng_state(), before[2])
        expected = {f"{t}/{k.split(',')[0]}": v for t in TASKS for k, v in setup["hf"]["results"][t].items()
                    if k.endswith(",none") and "_stderr" not in k}
        expected["t_gen_hf/exact_match"] = 1.0  # every generated text is hf's
        assert metrics == pytest.approx(expected, rel=1e-4)
        # The weights it scores are the live ones: a changed norm changes the metrics.
        with torch.no_grad():
            model.model.norm.weight.mul_(2.0)
        changed = downstream_metrics(TorchScorer.from_twin(model), setup["tokenizer"], ["t_rolling"],
                                     include_path=setup["tasks"])
    assert changed["t_rolling/bits_per_byte"] != pytest.approx(metrics["t_rolling/bits_per_byte"], rel=1e-3)


def test_python_m_hammer_lmeval_is_lm_eval_with_the_hammer_model(setup):
    out = subprocess.run(
        [sys.executable, "-m", "hammer.lmeval", "run", "--model", "hammer", "--model_args",
         f"pretrained={setup['src']},backend=torch", "--tasks", "t_mc", "--include_path", str(setup["tasks"]),
         "--batch_size", "2"], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    acc_norm = setup["hf"]["results"]["t_mc"]["acc_norm,none"]
    cells = [c.strip() for c in next(line for line in out.stdout.splitlines() if "acc_norm" in line).split("|")]
    assert float(cells[cells.index("acc_norm") + 2]) == pytest.approx(acc_norm, abs=1e-4)


SHARDED = """
import json, os, sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
import numpy as np
from flax import nnx
import hammer_jax
from hammer.tasks import downstream_metrics
from hammer.tokenizer import Tokenizer
from hammer_jax.generate import JaxStepper
from hammer_jax.scorer import JaxScorer
from hammer_jax.sharding import make_mesh, model_shardings

model = hammer_jax.from_pretrained({src!r})
ids = np.random.default_rng(0).integers(3, 401, (4, 40)).astype(np.int32)
whole = JaxScorer(model).token_scores(ids)
# What a trainer holds: a graphdef and a pure dict of parameters sharded over its mesh of both processes.
mesh = make_mesh({{"data": 2, "fsdp": 2, "tensor": 2}})
graphdef, state = nnx.split(model)
params = jax.device_put(nnx.to_pure_dict(state), nnx.to_pure_dict(model_shardings(model, mesh)))
live = nnx.merge(graphdef, params)
nll, greedy = JaxScorer(live).token_scores(ids)
metrics = downstream_metrics(JaxScorer(live), Tokenizer.from_pretrained({src!r}), {tasks!r},
                             include_path={include!r}, new_stepper=lambda n: JaxStepper(live, n))
leaf = jax.tree.leaves(params)[0]
print(json.dumps({{"devices": len(leaf.sharding.device_set), "local": len(leaf.addressable_shards),
                  "nll": float(np.abs(nll - whole[0]).max() / np.abs(whole[0]).max()),
                  "greedy": bool((greedy == whole[1]).all()), "metrics": metrics}}))
"""


def test_downstream_metrics_on_jax_parameters_sharded_over_two_processes(setup):
    """Both processes of a run score and generate with parameters sharded over both (2 x 4 CPU
    devices) and get lm-eval's hf numbers; t_gen_hf's targets are hf's own generations."""
    import socket

    from tests.train_fixtures import train_env

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        address = f"localhost:{sock.getsockname()[1]}"
    tasks = ["t_rolling", "t_mc", "t_gen_hf"]
    script = SHARDED.format(src=str(setup["src"]), tasks=tasks, include=str(setup["tasks"]))
    env = {**train_env(4), "HF_DATASETS_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script, address, str(i)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    expected = {f"{t}/{k.split(',')[0]}": v for t in ("t_rolling", "t_mc")
                for k, v in setup["hf"]["results"][t].items() if k.endswith(",none") and "_stderr" not in k}
    expected["t_gen_hf/exact_match"] = 1.0
    for out in outs:
        assert out["devices"] == 8 and out["local"] == 4
        assert out["nll"] < 1e-5 and out["greedy"]
        assert out["metrics"] == pytest.approx(expected, rel=1e-4)


def test_a_continuation_is_greedy_exactly_when_each_token_is_the_argmax(setup):
    from hammer.lmeval import HammerLM
    from hammer.sampling import Sampler, generate

    lm = HammerLM.from_pretrained(setup["src"], backend="torch")
    stepper = lm.new_stepper(lm.max_length)
    context = lm.tok_encode("The quick brown fox")
    greedy = generate(stepper, context, max_new_tokens=5, sampler=Sampler(0.0), eos_id=None)
    other = greedy[:-1] + [(greedy[-1] + 1) % lm.tokenizer.vocab_size]
    (ll_greedy, is_greedy), (ll_other, is_other) = lm._loglikelihood_tokens(
        [(None, context, greedy), (None, context, other)])
    assert is_greedy and not is_other
    assert ll_greedy > ll_other


@pytest.mark.parametrize("model_args, message", [
    ("pretrained=DIR,backnd=jax", "model_args: unknown key 'backnd'"),
    ("backend=jax", "model_args: expected pretrained=DIR"),
    ("pretrained=DIR,backend=hf", "backend 'hf': expected one of jax, torch"),
    ("pretrained=DIR,dtype=float16", "dtype 'float16': expected one of float32, bfloat16"),
    ("pretrained=DIR,batch_size=0", "batch_size must be a positive integer, got 0"),
])
def test_bad_model_args_are_named(setup, model_args, message):
    from hammer.errors import HammerError
    from hammer.lmeval import HammerLM

    with pytest.raises(HammerError, match=message):
        HammerLM.create_from_arg_string(model_args.replace("DIR", str(setup["src"])), {"device": "cuda:0"})
    with pytest.raises(HammerError, match="batch_size 'auto': hammer takes a positive integer"):
        HammerLM.create_from_arg_string(f"pretrained={setup['src']}", {"batch_size": "auto"})


def test_generation_from_an_empty_context_starts_at_bos(setup):
    from lm_eval.api.instance import Instance

    from hammer.lmeval import HammerLM
    from hammer.sampling import Sampler, generate

    lm = HammerLM.from_pretrained(setup["src"], backend="torch")
    request = Instance(request_type="generate_until", doc={}, arguments=("", {"max_gen_toks": 6, "until": []}),
                       idx=0)
    ids = generate(lm.new_stepper(lm.max_length), [lm.tokenizer.bos_id], max_new_tokens=6, sampler=Sampler(0.0),
                   eos_id=lm.tokenizer.eos_id)
    assert lm.generate_until([request]) == [lm.tokenizer.decode(ids)]
