"""The ``evaluate_<policy>`` stages on the tiny model: which policy it evaluates, what it measures, and how
it counts failed judgements (invalid, never losses)."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest

from cai.config import compose_config
from cai.errors import ConfigError
from cai.pipeline import plan

TINY = [
    "data.max_prompts=6",
    "sampling.max_new_tokens=6",
    "policy.tiny.n_layer=1",
    "policy.tiny.n_embd=32",
    "policy.tiny.n_head=2",
    "policy.tiny.vocab_size=512",
    "eval.max_prompts=6",
    "eval.max_new_tokens=6",
    "eval.bootstrap_resamples=100",
    # the SFT-only arm: the initial policy is evaluated and is the baseline (the quickstart's
    # default evaluates its ppo policy against its sft policy)
    "eval.policy=initial",
    "eval.baseline=initial",
]


# The quickstart as it was before it became the synthetic task with scripted judges: the project's
# own prompts (harmful ones are asked the harmlessness question) and the tiny model as local judge.
OFFLINE_HF = ["data=builtin", "constitution=harmless", "policy=tiny", "judge=tiny_hf", "eval=default",
              "critique.generator=policy", "eval.max_prompts=32", "eval.max_new_tokens=32",
              "eval.truth=null"]  # the synthetic task's rule means nothing on these prompts


def compose(*overrides: str):
    """The config `cai run <OFFLINE_HF> <overrides>` would run (an override replaces its OFFLINE_HF entry)."""
    given = {o.split("=")[0] for o in overrides}
    return compose_config(*(o for o in OFFLINE_HF if o.split("=")[0] not in given), *overrides)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """The SFT-only arm run end to end: prompts, tiny policy, evaluate (arm = baseline)."""
    from cai.pipeline import run_experiment

    root = tmp_path_factory.mktemp("eval")
    cfg = compose("experiment.stages=[evaluate]", f"store.root={root / 'store'}", *TINY)
    metrics = run_experiment(cfg, root / "run")
    info = json.loads((root / "run" / "run.json").read_text())
    return cfg, root, metrics, info


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _store(info):
    from cai.artifacts import ArtifactStore

    return ArtifactStore(info["store"])


def _perturbed_arm(info, out: Path, scale: float = 0.5) -> Path:
    """A stand-in trained policy: the tiny policy with seeded noise added to its weights."""
    import torch

    from cai.models import ModelSpec, load_causal_lm

    src = _store(info).path(info["artifacts"]["policy_model"]) / "model"
    model, tok = load_causal_lm(ModelSpec(str(src), device="cpu"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std().clamp_min(1e-3))
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    return out


def _stage(name: str, cfg):
    """Stage ``name`` as the pipeline plans it for ``cfg`` (a composed config)."""
    from cai.config import typed
    from cai.pipeline import make_stage

    return make_stage(name, typed(cfg))


def _build(store, stage, artifacts: dict[str, str], arm_dir: Path | None = None):
    """Build ``stage`` in ``store`` from upstream ``artifacts`` (stage -> key), keyed as the pipeline
    keys it; ``arm_dir`` stands in for the trained policy (input ``arm``)."""
    keys, paths = {}, {}
    for name, upstream in stage.inputs.items():
        if name == "arm":
            keys[name], paths[name] = f"ppo-test-{arm_dir.name}", arm_dir
        else:
            keys[name] = artifacts[upstream]
            paths[name] = store.path(keys[name])
    key = store.key(stage.name, stage.config, keys, version=stage.version)
    return store.build(key, lambda ctx: stage.run(paths, ctx))


def _evaluate(cfg, info, arm_dir: Path, store=None):
    """Build eval_baseline and then evaluate of ``cfg`` (a copy, with ``eval.policy=ppo``) with
    ``arm_dir`` as the trained ppo policy. Returns the evaluate result and the eval_baseline result."""
    cfg = copy.deepcopy(cfg)
    cfg.experiment.stages = ["ppo", "evaluate"]
    cfg.eval.policy = "ppo"
    store = store or _store(info)
    artifacts = dict(info["artifacts"])
    base = _build(store, _stage("eval_baseline", cfg), artifacts)
    artifacts["eval_baseline"] = base.key
    stage = _stage("evaluate_ppo", cfg)
    assert stage.inputs["arm"] == "ppo" and stage.inputs["eval_baseline"] == "eval_baseline"
    return _build(store, stage, artifacts, arm_dir), base


def test_sft_arm_is_a_tie_with_itself(sft_run):
    cfg, root, metrics, _ = sft_run
    n = metrics["eval/initial/prompts"]
    assert n == 6 and metrics["eval/initial/vs_sft/n"] == n
    # the arm is the baseline: same samples, so every prompt is a tie by definition, KL is 0
    assert metrics["eval/initial/vs_sft/identical"] == n and metrics["eval/initial/vs_sft/ties"] == n
    assert metrics["eval/initial/vs_sft/win_rate"] == 0.5 and metrics["eval/initial/vs_sft/lc_win_rate"] == 0.5
    assert metrics["eval/initial/kl"] == 0.0
    assert metrics["eval/initial/length"] == metrics["eval/initial/sft_length"]
    assert metrics["eval/initial/judge_is_labeller"] == 1  # the offline default judges with the labeller
    # builtin prompts tagged harmful are asked the harmlessness question, for arm and baseline
    h = metrics["eval/initial/harmless_prompts"]
    assert h > 0 and metrics["eval/initial/harmless/n"] == h == metrics["eval/initial/harmless_sft/n"]
    assert metrics["eval/initial/harmless/positive"] + metrics["eval/initial/harmless/negative"] \
        + metrics["eval/initial/harmless/undecided"] + metrics["eval/initial/harmless/invalid"] == h
    assert "eval/initial/rm_score" not in metrics  # no human data configured: no held-out RM
    rows = [json.loads(x) for x in (root / "store").glob("evaluate_initial/evaluate_initial-*/samples.jsonl").__next__()
            .read_text().splitlines()]
    assert len(rows) == n and all(r["arm_response"] == r["sft_response"] and r["outcome"] == "tie" for r in rows)
    # the arm's samples are the eval_baseline artifact's, reused: evaluate sampled nothing itself
    base = [json.loads(x) for x in (root / "store").glob("eval_baseline/eval_baseline-*/samples.jsonl").__next__()
            .read_text().splitlines()]
    assert [r["response"] for r in base] == [r["arm_response"] for r in rows]
    assert sum(r["harmless"] is not None for r in base) == h == metrics["eval_baseline/harmless_prompts"]
    phases = json.loads((root / "run" / "stages" / "evaluate.json").read_text())["phases_s"]
    assert "generate" not in phases and "load_model" not in phases
    assert metrics["pipeline/eval_baseline/reused"] == 0
    for k in ("positive", "negative", "undecided", "invalid", "mean_p"):  # one set of verdicts, not two
        assert _same(metrics[f"eval/initial/harmless/{k}"], metrics[f"eval/initial/harmless_sft/{k}"]), k


def test_second_run_reuses_and_reports_the_same(sft_run, tmp_path):
    from cai.pipeline import run_experiment

    cfg, root, metrics, _ = sft_run
    again = run_experiment(cfg, tmp_path / "run2")
    assert again["pipeline/evaluate/reused"] == 1
    assert {k: v for k, v in again.items() if k.startswith("eval/")} == \
        {k: v for k, v in metrics.items() if k.startswith("eval/")}


def test_trained_arm_is_judged_and_kl_measured(sft_run, tmp_path):
    cfg, _, _, info = sft_run
    arm = _perturbed_arm(info, tmp_path / "arm")
    result, base = _evaluate(cfg, info, arm)
    m, folder = result.stage_info["metrics"], result.path
    assert base.reused and base.key == info["artifacts"]["eval_baseline"]  # the SFT arm's: shared
    n = m["eval/ppo/vs_sft/n"]
    assert m["eval/ppo/vs_sft/identical"] < n
    assert m["eval/ppo/vs_sft/wins"] + m["eval/ppo/vs_sft/ties"] + m["eval/ppo/vs_sft/losses"] \
        + m["eval/ppo/vs_sft/invalid"] == n
    assert 0.0 <= m["eval/ppo/vs_sft/win_rate_ci_low"] <= m["eval/ppo/vs_sft/win_rate"] \
        <= m["eval/ppo/vs_sft/win_rate_ci_high"] <= 1
    assert math.isfinite(m["eval/ppo/kl"]) and m["eval/ppo/kl"] != 0.0
    rows = [json.loads(x) for x in (folder / "samples.jsonl").read_text().splitlines()]
    assert sum(r["kl"] for r in rows) / len(rows) == pytest.approx(m["eval/ppo/kl"])
    # determinism: the same inputs in a fresh store give the same numbers
    shutil.rmtree(folder)
    again, _ = _evaluate(cfg, info, arm)
    assert {k: v for k, v in again.stage_info["metrics"].items() if k.startswith("eval/ppo/")} == \
        {k: v for k, v in m.items() if k.startswith("eval/ppo/")}
    # the baseline side comes from the shared artifact: the same numbers as the SFT arm's
    _, _, sft_metrics, _ = sft_run
    for key in ("eval/ppo/sft_length", "eval/ppo/harmless_sft/rate", "eval/ppo/harmless_sft/mean_p"):
        assert _same(m[key], sft_metrics[key.replace("eval/ppo/", "eval/initial/")]), key


def test_failed_judgements_are_invalid_not_losses(sft_run, tmp_path):
    from cai.testing.servers import FakeOpenAIServer, Faults

    cfg, _, _, info = sft_run
    cfg = copy.deepcopy(cfg)  # the module's run keeps its judge
    arm = _perturbed_arm(info, tmp_path / "arm_api")
    with FakeOpenAIServer(faults=Faults(refusal=0.4, seed=3)) as srv:
        cfg.eval.judge.backend = "openai"
        cfg.eval.judge.model = "fake"
        cfg.eval.judge.base_url = srv.base_url
        cfg.eval.judge.api_key_env = None
        cfg.eval.judge.max_retries = 0
        cfg.eval.judge.cache = False
        m = _evaluate(cfg, info, arm)[0].stage_info["metrics"]
    assert m["eval/ppo/judge_is_labeller"] == 0
    n = m["eval/ppo/vs_sft/n"] - m["eval/ppo/vs_sft/identical"]
    assert n > 0 and m["eval/ppo/vs_sft/invalid"] > 0
    assert m["eval/ppo/vs_sft/invalid_refusal"] == m["eval/ppo/vs_sft/invalid"]
    decided = m["eval/ppo/vs_sft/wins"] + m["eval/ppo/vs_sft/ties"] + m["eval/ppo/vs_sft/losses"]
    assert decided + m["eval/ppo/vs_sft/invalid"] == m["eval/ppo/vs_sft/n"]
    if decided:
        expected = (m["eval/ppo/vs_sft/wins"] + m["eval/ppo/vs_sft/ties"] / 2) / decided
        assert m["eval/ppo/vs_sft/win_rate"] == pytest.approx(expected)  # invalid is outside the denominator


def test_evaluated_policy_and_baseline_are_explicit_and_runtime_stays_out_of_the_key():
    from cai.pipeline import evaluated_policies, headline_policy, typed

    for policy in ("initial", "sft", "dpo", "ppo"):
        stage = _stage(f"evaluate_{policy}", compose("experiment.stages=[evaluate]", f"eval.policy={policy}",
                                                    "eval.baseline=initial"))
        assert stage.inputs.get("arm") == (None if policy == "initial" else policy)
        assert "policy" not in stage.config["eval"] and "policies" not in stage.config["eval"]
        assert "baseline" not in stage.inputs and stage.config["eval"]["baseline"] == "initial"
    # the arms of the matched study evaluate the policy they train, against the initial policy
    for arm, policy in (("sft", "initial"), ("sl_cai", "sft"), ("dpo_ai", "dpo"), ("rlaif", "ppo")):
        cfg = compose("experiment=rlaif_vs_rlhf", f"arm={arm}")
        assert evaluated_policies(typed(cfg)) == [policy], arm
        inputs = _stage(f"evaluate_{policy}", cfg).inputs
        assert inputs.get("arm", "initial") == policy and "baseline" not in inputs, arm
        assert _stage("evaluate", cfg).inputs == {policy: f"evaluate_{policy}"}
    # the quickstart trains sft, dpo and ppo and is judged against its sft: dpo and ppo are evaluated,
    # each its own artifact; ppo is the headline (eval.policy)
    quick = typed(compose())
    assert evaluated_policies(quick) == ["dpo", "ppo"] and headline_policy(quick) == "ppo"
    assert evaluated_policies(typed(compose("eval.policies=[sft,ppo]"))) == ["sft", "ppo"]
    assert evaluated_policies(typed(compose("eval.policies=[trained]", "eval.policy=null"))) == ["dpo", "ppo"]
    assert headline_policy(typed(compose("eval.policies=[sft,dpo]", "eval.policy=null"))) == "dpo"
    # adding a policy to the list builds its evaluation and leaves the others' keys alone
    one = {s.name: s.config for s in plan(compose("eval.policies=[ppo]"))}
    two = {s.name: s.config for s in plan(compose("eval.policies=[ppo,dpo]"))}
    assert "evaluate_dpo" not in one and one["evaluate_ppo"] == two["evaluate_ppo"]
    # eval.baseline=sft: PPO/DPO on top of the run's own SFT are compared with that SFT policy
    on_sft = _stage("evaluate_ppo", compose("experiment.stages=[sft,ppo,evaluate]", "eval.policy=ppo",
                                            "eval.baseline=sft"))
    assert on_sft.inputs["baseline"] == "sft" and on_sft.inputs["arm"] == "ppo"
    assert on_sft.config["eval"]["baseline"] == "sft"
    # planning builds the stage the evaluated policy comes from, and the baseline's
    planned = [s.name for s in plan(compose("experiment.stages=[evaluate]", "eval.policy=sft",
                                            "eval.baseline=sft"))]
    assert planned.index("sft") < planned.index("eval_baseline") < planned.index("evaluate_sft") \
        < planned.index("evaluate")
    a = _stage("evaluate_ppo", compose("experiment.stages=[evaluate]"))
    assert (a.inputs["arm"], a.inputs["baseline"]) == ("ppo", "sft")  # the quickstart: its ppo against its sft
    b = _stage("evaluate_ppo", compose("experiment.stages=[evaluate]", "eval.judge.max_concurrency=4",
                                       "eval.hf_batch_size=2", "policy.device=cpu"))
    assert a.config == b.config  # how fast / where: not what it computes
    assert (b.cfg.eval.hf_batch_size, b.cfg.policy.device) == (2, "cpu")  # ... but read at run time
    c = _stage("evaluate_ppo", compose("experiment.stages=[evaluate]", "eval.max_new_tokens=7"))
    assert c.config != a.config


def test_stage_refuses_inputs_that_disagree_with_the_config(tmp_path):
    """The arm's and the baseline's artifacts are the inputs the pipeline wires from eval.policy and
    eval.baseline; a hand-made call that disagrees is refused, naming the field."""
    from cai.evaluate.baseline import baseline_location, policy_artifact

    on_sft = _stage("eval_baseline", compose("eval.baseline=sft")).cfg  # the quickstart's
    assert baseline_location(on_sft, {"baseline": tmp_path}) == str(tmp_path / "model")
    with pytest.raises(ConfigError, match="eval.baseline=sft"):
        baseline_location(on_sft, {"policy_model": tmp_path})
    initial = _stage("eval_baseline", compose("eval.baseline=initial")).cfg
    assert baseline_location(initial, {"policy_model": tmp_path}) == str(tmp_path / "model")
    with pytest.raises(ConfigError, match="eval.baseline=initial"):
        baseline_location(initial, {"policy_model": tmp_path, "baseline": tmp_path})
    # the arm's artifact likewise (what evaluate reads it with)
    assert policy_artifact({"arm": tmp_path}, "arm", "ppo", "eval.policy") == str(tmp_path / "model")
    with pytest.raises(ConfigError, match="eval.policy=ppo"):
        policy_artifact({"policy_model": tmp_path}, "arm", "ppo", "eval.policy")
    assert policy_artifact({}, "arm", "initial", "eval.policy") is None


def test_one_baseline_artifact_for_every_arm_keyed_by_what_determines_it():
    from omegaconf import OmegaConf

    composed = compose("experiment.stages=[evaluate]", "eval.policy=initial",
                       "eval.baseline=initial")  # composed once; each case edits a copy

    def base(*overrides):
        cfg = copy.deepcopy(composed)
        for item in overrides:
            key, value = item.split("=", 1)
            OmegaConf.update(cfg, key, OmegaConf.from_dotlist([f"v={value}"]).v, merge=False)
        return _stage("eval_baseline", cfg)

    arms = [base(f"experiment.stages=[{s},evaluate]", f"eval.policy={s}") for s in ("sft", "dpo", "ppo")]
    arms.insert(0, base())
    assert all(b.config == arms[0].config and b.inputs == arms[0].inputs for b in arms)  # shared by every arm
    assert arms[0].inputs == {"prompts": "prompts", "policy_model": "policy_model"}
    # how fast and where, and what only the arm's side uses: not in the key
    for extra in (("eval.judge.max_concurrency=4", "eval.hf_batch_size=2", "eval.judge_batch=3", "policy.device=cpu"),
                  ("eval.question=Which?", "eval.bootstrap_resamples=10", "eval.kl=false", "eval.ties=excluded",
                   "eval.use_rm=false", "judge.model=another-labeller")):
        assert base(*extra).config == arms[0].config, extra
    # what changes the baseline's samples or verdicts: in the key
    for extra in ("eval.max_new_tokens=7", "eval.batch_size=4", "eval.max_prompts=3", "eval.temperature=0.5",
                  "eval.harmless_prompts=all", "eval.judge.model=other", "seed=1", "policy.max_length=256"):
        assert base(extra).config != arms[0].config, extra
    # without harmlessness questions the judge does not matter
    assert base("eval.harmless=false", "eval.judge.model=a").config == \
        base("eval.harmless=false", "eval.judge.model=b").config
    # eval.baseline=sft: PPO on the run's own SFT is compared with that SFT policy
    on_sft = base("experiment.stages=[sft,ppo,evaluate]", "eval.policy=ppo", "eval.baseline=sft")
    assert on_sft.inputs["baseline"] == "sft" and on_sft.config["eval.baseline"] == "sft"
    # the same row through Hydra: a run-time override composes to the same key
    assert _stage("eval_baseline", compose("experiment.stages=[ppo,evaluate]", "eval.policy=ppo",
                                           "eval.baseline=initial", "eval.judge_batch=5")).config == arms[0].config


def _eval_judge_key(stage) -> dict:
    """eval.judge's part of a stage's key (evaluate reads all of eval, eval_baseline eval.judge)."""
    return stage.config["eval"]["judge"] if "eval" in stage.config else stage.config["eval.judge"]


def test_eval_judge_is_keyed_and_run_like_the_labeller(tmp_path):
    """eval.judge's key is judge_key (a non-auto dtype included), the rest reaches the judge at run
    time: device, and batch size, which wins over eval.hf_batch_size. The default config's keys are
    pinned (placeholder upstream keys: only this stage's own slice counts)."""
    from cai.artifacts import ArtifactStore
    from cai.evaluate.baseline import JudgeSession
    from cai.evaluate.stage import judge_is_labeller
    from cai.journal import BuildContext
    from cai.judges.config import stage_judge

    def stages(*extra):  # (evaluate, eval_baseline)
        cfg = compose(f"store.root={tmp_path}", *extra)
        return _stage("evaluate_ppo", cfg), _stage("eval_baseline", cfg)

    default, half = stages(), stages("eval.judge.dtype=bfloat16")
    local = stages("eval.judge.device=cpu", "eval.judge.batch_size=3")
    store = ArtifactStore(tmp_path)
    keys = [store.key(s.name, s.config, {n: f"{u}-upstream" for n, u in s.inputs.items()}, version=s.version)
            for s in default]
    assert keys == KEYS
    for d, loc, h in zip(default, local, half):
        assert loc.config == d.config and loc.cfg.eval.judge.device == "cpu"
        assert _eval_judge_key(h) == {**_eval_judge_key(d), "dtype": "bfloat16"}
    # the labeller's judge is the eval judge when their keys are equal, whatever their run-time fields
    assert judge_is_labeller(default[0].cfg) and not judge_is_labeller(half[0].cfg)
    same = stages("judge.dtype=bfloat16", "eval.judge.dtype=bfloat16", "judge.device=cpu")[0]
    assert judge_is_labeller(same.cfg)
    assert same.config != half[0].config  # the labeller is read (to say whether it judges): keyed
    for stage, batch, device in ((local[0], 3, "cpu"), (default[0], 8, "auto")):
        ctx = BuildContext("evaluate-x", tmp_path / "out", tmp_path / f"state{batch}", False, 1)
        judge = stage_judge(stage.cfg.eval.judge, {"policy_model": tmp_path}, "eval.judge")
        assert judge.model == str(tmp_path / "model")  # model tiny: the tiny policy artifact
        with JudgeSession(ctx, judge, stage="evaluate", cache_path=stage.cfg.judge_cache,
                          judge_batch=stage.cfg.eval.judge_batch,
                          hf_batch_size=stage.cfg.eval.hf_batch_size) as session:
            backend = session._open()  # the hf judge loads its model on first use: nothing is loaded here
            assert (backend.batch_size, backend.spec.device) == (batch, device)


# the default config's (evaluate_ppo, eval_baseline) keys with placeholder upstream keys: a change is a
# change of every stored evaluation's key (bump the row's version on purpose, or fix the key)
KEYS = ["evaluate_ppo-84a570d75e3588a40b2d", "eval_baseline-509f592fcac4d5d8dd21"]


def test_held_out_rm_only_with_human_data(shared_data_dir, tmp_path, monkeypatch):
    import cai.train.reward as reward

    path = shared_data_dir / "hh-rlhf" / "harmless-base-dev.jsonl.gz"
    cfg = compose("experiment.stages=[evaluate]", f"data.human.path={path}", "data.prompts=builtin")
    stage = _stage("evaluate_ppo", cfg)
    # another held-out RM: another key
    assert stage.inputs["eval_reward"] == "eval_reward" and "eval.rm" in stage.config
    rm = _stage("eval_reward", cfg)
    assert rm.config["eval.rm"]["labels_from"] == "human" and rm.inputs["human_pairs"] == "human_pairs"
    assert rm.config["eval.rm_seed_offset"] == cfg.eval.rm_seed_offset and rm.config["seed"] == cfg.seed
    # the held-out RM trains with seed + eval.rm_seed_offset, its metrics renamed eval_rm/...
    seen = {}

    def build_reward_model(rcfg, seed, inputs, ctx):
        seen.update(rcfg=rcfg, seed=seed)
        ctx.set_metrics({"rm/accuracy": 1.0})

    class Ctx:
        def set_metrics(self, metrics):
            seen["metrics"] = metrics

    monkeypatch.setattr(reward, "build_reward_model", build_reward_model)
    rm.run({"human_pairs": tmp_path}, Ctx())
    assert seen["seed"] == cfg.seed + cfg.eval.rm_seed_offset and seen["rcfg"].labels_from == "human"
    assert seen["metrics"] == {"eval_rm/accuracy": 1.0}
    without = _stage("evaluate_ppo",
                     compose("experiment.stages=[evaluate]", f"data.human.path={path}", "eval.use_rm=false"))
    assert "eval_reward" not in without.inputs and "eval.rm" not in without.config \
        and "rm" not in without.config["eval"]
    with pytest.raises(ConfigError, match="eval_reward trains on human labels"):
        _stage("eval_reward", compose("experiment.stages=[evaluate]"))


@pytest.mark.parametrize("override, field", [("eval.harmless_prompts=some", "harmless_prompts"),
                                             ("eval.ties=never", "ties"), ("eval.tie_margin=0.7", "tie_margin"),
                                             ("eval.max_prompts=0", "max_prompts"),
                                             ("eval.baseline=best", "baseline"), ("eval.policy=rlhf", "policy"),
                                             ("eval.policies=[ppo,rlhf]", "policies"),
                                             ("eval.judge_batch=0", "judge_batch")])
def test_bad_eval_config_names_the_field(override, field):
    with pytest.raises(ConfigError, match=f"eval.{field}"):
        plan(compose("experiment.stages=[evaluate]", override))


def test_held_out_rm_scores_every_response(shared_data_dir, tmp_path):
    """With HH-RLHF configured, a reward model on human labels (stage eval_reward) scores the arm
    and the baseline; its training metrics are renamed so they never clash with the arm's RM."""
    from cai.pipeline import run_experiment

    hh = shared_data_dir / "hh-rlhf" / "harmless-base-dev.jsonl.gz"
    cfg = compose("data=hh_rlhf", f"data.human.path={hh}", "data.human.limit=32", "experiment.stages=[evaluate]",
                  "eval.rm.batch_size=8", "eval.rm.micro_batch_size=8", "eval.rm.bootstrap_resamples=50",
                  f"store.root={tmp_path / 'store'}", *TINY)
    m = run_experiment(cfg, tmp_path / "run")
    assert m["eval/initial/rm_score_ci_low"] <= m["eval/initial/rm_score"] <= m["eval/initial/rm_score_ci_high"]
    # the SFT arm is its own baseline
    assert m["eval/initial/rm_score"] == pytest.approx(m["eval/initial/sft_rm_score"])
    assert m["eval/initial/rm_score_vs_sft"] == 0.0
    assert any(k.startswith("eval_rm/") for k in m) and not any(k.startswith("rm/") for k in m)
    # red-team prompts (tagged harmful) are all asked the harmlessness question
    assert m["eval/initial/harmless_prompts"] == m["eval/initial/prompts"]
    # every prompt's scores are in samples.jsonl (the report's paired tests between arms read them)
    from cai.artifacts import ArtifactStore
    from cai.data import read_jsonl

    key = json.loads((tmp_path / "run" / "run.json").read_text())["artifacts"]["evaluate_initial"]
    rows = read_jsonl(ArtifactStore(tmp_path / "store").path(key) / "samples.jsonl")
    assert len(rows) == m["eval/initial/prompts"] and all(isinstance(r["rm_score"], float) for r in rows)
    assert sum(r["rm_score"] for r in rows) / len(rows) == pytest.approx(m["eval/initial/rm_score"])


# ----------------------------------------------------------------------------- resuming a killed evaluation
class _Killed(Exception):
    """Stands in for the process dying in the middle of a stage."""


class _Meter:
    """Every generate call (prompts per call) and judge call (requests per call) of the stages;
    the call numbered ``die_generate`` / ``die_judge`` since the last :meth:`reset` raises."""

    def __init__(self) -> None:
        self.reset()

    def reset(self, die_generate: int | None = None, die_judge: int | None = None) -> None:
        self.generate: list[int] = []
        self.judge: list[int] = []
        self.die_generate, self.die_judge = die_generate, die_judge


@pytest.fixture
def meter(monkeypatch):
    import cai.judges as judges
    from cai.sampling import SamplingEngine

    m = _Meter()
    real_generate, real_make = SamplingEngine.generate, judges.make_judge

    def generate(self, prompts, params, *args, **kwargs):
        m.generate.append(len(prompts))
        if len(m.generate) == m.die_generate:
            raise _Killed("generate")
        return real_generate(self, prompts, params, *args, **kwargs)

    def make_judge(*args, **kwargs):
        backend = real_make(*args, **kwargs)
        inner = backend.choose_many

        async def choose_many(reqs, progress=False):
            m.judge.append(len(reqs))
            if len(m.judge) == m.die_judge:
                raise _Killed("judge")
            return await inner(reqs, progress=progress)

        backend.choose_many = choose_many
        return backend

    monkeypatch.setattr(SamplingEngine, "generate", generate)
    monkeypatch.setattr(judges, "make_judge", make_judge)
    return m


def _verdicts(path: Path) -> list:
    """eval_baseline rows without the answers' timing and cache fields (which differ run to run)."""
    rows = [json.loads(x) for x in (path / "samples.jsonl").read_text().splitlines()]
    return [{**r, "harmless": {k: r["harmless"][k] for k in ("probs", "status", "failure_reason")}} for r in rows]


def test_killed_evaluation_resumes_without_redoing_anything(sft_run, tmp_path, meter):
    """Kill eval_baseline while it samples, evaluate while it samples and while the judge answers;
    each rerun redoes nothing already done, and the end result is an uninterrupted run's."""
    from cai.artifacts import ArtifactStore

    _, root, _, info = sft_run
    arm = _perturbed_arm(info, tmp_path / "arm")
    skip = shutil.ignore_patterns("evaluate_*", "eval_baseline", "judge_cache*", ".locks")

    def run(store_dir: Path):
        if not store_dir.exists():  # the upstream artifacts (prompts, tiny policy) of the SFT run
            shutil.copytree(root / "store", store_dir, ignore=skip)
        cfg = compose("experiment.stages=[evaluate]", f"store.root={store_dir}", *TINY, "eval.batch_size=2",
                      "eval.judge_batch=2", "eval.harmless_prompts=all", "eval.judge.cache=false")
        return _evaluate(cfg, info, arm, ArtifactStore(store_dir))

    whole, whole_base = run(tmp_path / "whole")
    assert meter.generate == [2] * 6  # 6 prompts in batches of 2: the baseline's 3, then the arm's 3
    asked = sum(meter.judge)  # 6 baseline verdicts, the comparisons, 6 arm verdicts
    killed = tmp_path / "killed"
    meter.reset(die_generate=2)  # dies sampling the baseline's 2nd batch
    with pytest.raises(_Killed):
        run(killed)
    meter.reset(die_generate=4)  # the baseline's last 2 batches, its verdicts; dies in the arm's 2nd batch
    with pytest.raises(_Killed):
        run(killed)
    assert len(meter.generate) == 4 and meter.judge == [2, 2, 2]
    meter.reset(die_judge=2)  # the arm's last 2 batches; dies while the judge answers the 2nd request batch
    with pytest.raises(_Killed):
        run(killed)
    assert len(meter.generate) == 2 and len(meter.judge) == 2
    meter.reset()
    resumed, base = run(killed)
    assert meter.generate == []  # nothing sampled again
    assert sum(meter.judge) == asked - 6 - 2  # nothing asked again: not the baseline's 6, not the first batch
    assert base.reused and base.stage_info["attempt"] == 2
    assert resumed.stage_info["attempt"] == 3 and resumed.stage_info["resumed_records"] == 6 + 2
    assert resumed.stage_info["metrics"] == whole.stage_info["metrics"]
    assert base.stage_info["metrics"] == whole_base.stage_info["metrics"]
    assert (resumed.path / "samples.jsonl").read_bytes() == (whole.path / "samples.jsonl").read_bytes()
    assert _verdicts(base.path) == _verdicts(whole_base.path)


def test_judge_budget_stops_cleanly_and_a_rerun_asks_only_the_rest(sft_run, tmp_path):
    """The held-out judge's dollar cap stops the evaluation with a clear message, keeping every
    answer it paid for; a rerun with a larger cap sends only requests never answered."""
    from cai.errors import CaiError
    from cai.testing.servers import FakeOpenAIServer

    _, _, _, info = sft_run
    arm = _perturbed_arm(info, tmp_path / "arm_budget")
    with FakeOpenAIServer() as srv:
        def run(dollars: float):
            cfg = compose("experiment.stages=[evaluate]", *TINY, "eval.judge.backend=openai", "eval.judge.model=fake",
                          f"eval.judge.base_url={srv.base_url}", "eval.judge.api_key_env=null",
                          "eval.judge.cache=false", "eval.judge.max_retries=0", "eval.judge_batch=4",
                          "eval.harmless_prompts=all", f"eval.judge.max_dollars={dollars}",
                          "+eval.judge.prices.fake={input_per_mtok: 1000, output_per_mtok: 1000}")
            return _evaluate(cfg, info, arm)

        with pytest.raises(CaiError, match=r"stopped at budget.*judge answers of this stage are journaled"):
            run(2.0)
        paid = {r.body_hash for r in srv.records if r.outcome == "ok"}
        assert paid
        srv.reset_log()
        result, base = run(1000.0)  # the cap is run time only: the same artifacts resume
        assert paid.isdisjoint(r.body_hash for r in srv.records)
    m = result.stage_info["metrics"]
    assert m["eval/ppo/vs_sft/invalid"] == 0
    assert m["eval/ppo/harmless/n"] == m["eval/ppo/harmless_sft/n"] == m["eval/ppo/prompts"]
    assert result.stage_info["cost"]["dollars"] + base.stage_info["cost"]["dollars"] > 0


# ----------------------------------------------------------------------------- eval.truth: a known rule
def test_truth_metrics_by_hand():
    """The mean grade (BCa interval) and the share at the rule's lowest grade (Wilson interval)."""
    from cai.data import Prompt, Turn, conversation_id
    from cai.errors import DataError
    from cai.evaluate.truth import grade_replies, truth_metrics
    from cai.stats import wilson_ci

    grades = [2.0, 2.0, 1.0, 0.0, 2.0, 0.0, 1.0, 2.0]
    m = truth_metrics(grades, 0.0, "eval/truth", n_boot=500, seed=0)
    assert (m["eval/truth/mean"], m["eval/truth/lowest"], m["eval/truth/n"]) == (1.25, 2, 8)
    assert m["eval/truth/lowest_rate"] == 0.25
    assert (m["eval/truth/lowest_rate_ci_low"], m["eval/truth/lowest_rate_ci_high"]) == wilson_ci(2, 8)
    assert 0.0 <= m["eval/truth/mean_ci_low"] < 1.25 < m["eval/truth/mean_ci_high"] <= 2.0
    assert truth_metrics(grades, 0.0, "eval/truth", n_boot=500, seed=0) == m  # seeded
    # "lowest" is at or below eval.truth_lowest: a rule whose floor is 1 counts the 1s and the 0s
    assert truth_metrics(grades, 1.0, "x", n_boot=100, seed=0)["x/lowest"] == 4
    # every grade equal: a point interval, not an error
    same = truth_metrics([2.0] * 5, 0.0, "x", n_boot=100, seed=0)
    assert (same["x/mean"], same["x/mean_ci_low"], same["x/mean_ci_high"], same["x/lowest_rate"]) == (2, 2, 2, 0)
    assert math.isnan(truth_metrics([], 0.0, "x", n_boot=100, seed=0)["x/mean"])

    prompts = [Prompt(conversation_id(t), t, "test") for t in
               [(Turn("user", f"Could you check the budget {i}?"),) for i in range(3)]]
    seen = []
    assert grade_replies(lambda q, r: seen.append((q, r)) or len(r), prompts, [" ab ", "abc", ""]) == [2.0, 3.0, 0.0]
    assert seen[0] == ("Could you check the budget 0?", "ab")  # the last user turn and the stripped reply
    for bad in (None, "two", float("nan"), True):
        with pytest.raises(DataError, match=rf"^eval\.truth: the rule graded the reply to prompt '{prompts[0].id}'"):
            grade_replies(lambda q, r, bad=bad: bad, prompts, ["a", "b", "c"])


def test_truth_is_keyed_by_its_source_only_when_set(tmp_path):
    """eval.truth enters the keys of eval_baseline and evaluate_<policy> only when set, with the
    rule's source digest (as labels.truth); planning names eval.truth when it cannot load it."""
    from cai.judges.python_judge import source_digest

    rule = "cai.testing.preference_task:task_grade"
    without = {s: _stage(s, compose("experiment.stages=[ppo,evaluate]", "eval.policy=ppo"))
               for s in ("eval_baseline", "evaluate_ppo")}
    assert not any("truth" in json.dumps(st.config) for st in without.values())
    with_rule = {s: _stage(s, compose("experiment.stages=[ppo,evaluate]", "eval.policy=ppo", f"eval.truth={rule}"))
                 for s in ("eval_baseline", "evaluate_ppo")}
    digest = source_digest(rule)
    assert with_rule["eval_baseline"].config["contents"] == {"eval.truth": digest}
    assert with_rule["eval_baseline"].config["eval.truth"] == rule
    assert with_rule["evaluate_ppo"].config["contents"]["eval.truth"] == digest
    assert with_rule["evaluate_ppo"].config["eval"]["truth"] == rule
    lowest = _stage("eval_baseline", compose("experiment.stages=[evaluate]", f"eval.truth={rule}",
                                             "eval.truth_lowest=1"))
    assert lowest.config["eval.truth_lowest"] == 1 and lowest.config != with_rule["eval_baseline"].config
    with pytest.raises(ConfigError, match=r"^eval\.truth: module 'cai.testing.preference_task' has no attribute"):
        plan(compose("experiment.stages=[evaluate]", "eval.truth=cai.testing.preference_task:nope",
                     f"store.root={tmp_path}"))


def test_truth_grades_the_arm_and_the_baseline(sft_run, tmp_path):
    """With eval.truth, evaluate_<policy> grades both sides' replies (samples.jsonl keeps each grade)
    and eval_baseline the baseline's: the same numbers."""
    import importlib
    import sys

    from cai.data import Prompt, read_jsonl

    (tmp_path / "truth_rule_eval.py").write_text("def grade(question, reply):\n    return len(reply) % 3\n")
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    from truth_rule_eval import grade

    cfg, _, _, info = sft_run
    cfg = copy.deepcopy(cfg)
    cfg.eval.truth = "truth_rule_eval:grade"
    arm = _perturbed_arm(info, tmp_path / "arm")
    result, base = _evaluate(cfg, info, arm)
    m, b = result.stage_info["metrics"], base.stage_info["metrics"]
    assert not base.reused  # the baseline is graded: a new artifact
    rows = read_jsonl(result.path / "samples.jsonl")
    prompts = {p["id"]: Prompt.from_dict(p)
               for p in read_jsonl(_store(info).path(info["artifacts"]["prompts"]) / "test.jsonl")}
    assert [r["truth_grade"] for r in rows] == [grade(prompts[r["prompt_id"]].question, r["arm_response"].strip())
                                                for r in rows]
    assert m["eval/ppo/truth/n"] == len(rows) == m["eval/ppo/truth_sft/n"]
    assert m["eval/ppo/truth/mean"] == pytest.approx(sum(r["truth_grade"] for r in rows) / len(rows))
    assert m["eval/ppo/truth/lowest"] == sum(r["truth_grade"] <= 0 for r in rows)
    assert m["eval/ppo/truth_sft/lowest"] == sum(r["sft_truth_grade"] <= 0 for r in rows)
    assert [r["truth_grade"] for r in read_jsonl(base.path / "samples.jsonl")] == [r["sft_truth_grade"] for r in rows]
    for name in ("mean", "mean_ci_low", "mean_ci_high", "lowest_rate", "lowest_rate_ci_low", "n"):
        assert _same(b[f"eval/baseline/truth/{name}"], m[f"eval/ppo/truth_sft/{name}"]), name
    sys.path.remove(str(tmp_path))
