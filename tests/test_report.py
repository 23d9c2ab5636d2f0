"""`cai report`: sections from a realistic sweep, HTML checked in headless Chromium, the Hydra
callback, and a report on a real `cai run -m` sweep.

The realistic sweep is made by the real pipeline (`run_experiment`, the real artifact store and
the real `prompts` stage) with small stand-in training/evaluation stages registered in STAGES:
they write train logs and the metrics the real stages write (win rates through
`cai.evaluate.win_rate`), so run.json, metrics.json and stages/*.json are exactly what a run writes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from cai import pipeline
from cai.cli import ReportCallback
from cai.config import Config
from cai.errors import DataError
from cai.evaluate.winrates import Judgement, win_rate
from cai.report.build import main, write_report
from cai.report.runs import collect

REPO = Path(__file__).resolve().parents[1]
PRINCIPLES = ("harm-avoid", "honesty", "no-preach")
ARMS = ("ai", "human")
SEEDS = (0, 1)


# ----------------------------------------------------------------------------- stand-in stages
def _log(ctx, rows):
    (ctx.dir / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _labels(cfg, inputs, ctx):
    ai = cfg.reward.labels_from == "ai"
    ctx.add_cost(tokens_in=5000 if ai else 0, tokens_out=400 if ai else 0, dollars=0.125 if ai else 0.0)
    if ai:  # a slot-biased labeller that failed on 2 of 64 pairs
        m = {"quality/agreement": 0.71, "quality/agreement_ci_low": 0.62, "quality/agreement_ci_high": 0.79,
             "label/pairs": 64, "label/failed": 2, "label/same_slot_rate": 0.8, "label/position_consistency": 0.2,
             "label/first_slot_rate": 0.9}
        for i, pid in enumerate(PRINCIPLES):
            m[f"quality/principle/{pid}/agreement"] = 0.6 + 0.1 * i
            m[f"quality/principle/{pid}/n"] = 20 + i
        ctx.set_metrics(m)


def _reward(cfg, inputs, ctx):
    rng = np.random.default_rng(cfg.seed)
    _log(ctx, [{"step": s, "rm/loss": 0.7 * 0.97**s + 0.01 * rng.random()} for s in range(30)])
    acc = 0.68 + 0.02 * cfg.seed + (0.03 if cfg.reward.labels_from == "human" else 0.0)
    human = cfg.reward.labels_from == "human"  # the human arm had 30x the labels: a budget the report names
    ctx.set_metrics({"rm/accuracy": acc, "rm/accuracy_ci_low": acc - 0.05, "rm/accuracy_ci_high": acc + 0.05,
                     "rm/data/used": 1920 if human else 62, "rm/steps": 30,
                     # reward.eval_sets: one scored pair file (cai.report.reward_eval's metric names)
                     "rm/sets/extra_pairs/pairs": 40, "rm/sets/extra_pairs/accuracy": 0.625 + 0.025 * cfg.seed,
                     "rm/sets/extra_pairs/accuracy_ci_low": 0.47, "rm/sets/extra_pairs/accuracy_ci_high": 0.76,
                     "rm/sets/extra_pairs/ece": 0.08, "rm/sets/extra_pairs/length_corr": -0.1})


def _ppo(cfg, inputs, ctx):
    rng = np.random.default_rng(10 + cfg.seed + (5 if cfg.reward.labels_from == "ai" else 0))
    kl = 0.02 if cfg.reward.labels_from == "ai" else 0.03
    _log(ctx, [{"step": s, "ppo/objective/kl": kl * s, "ppo/objective/scores": np.log1p(s) + rng.random(),
                "ppo/response_length": 40 + s * rng.random(), "ppo/reward_failed": 0.0,
                "ppo/time/score_s": 0.5, "ppo/policy/clipfrac_avg": 0.1} for s in range(0, 40, 2)])
    ctx.add_cost(tokens_in=100, tokens_out=900)
    warned = 3 if cfg.reward.labels_from == "ai" else 0
    ctx.set_metrics({"ppo/objective/kl": 0.78, "ppo/steps": 20, "ppo/warnings": warned})


def _dpo(cfg, inputs, ctx):  # one logged point: it must still show (markers)
    _log(ctx, [{"step": 1, "dpo/loss": 0.69, "dpo/rewards/margins": 0.01 + 0.01 * cfg.seed}])
    ctx.set_metrics({"dpo/steps": 1, "dpo/data/used": 62})


def _eval_metrics(cfg, policy, p):
    rng = np.random.default_rng([cfg.seed, int(cfg.reward.labels_from == "ai"), len(policy)])
    js = [Judgement(f"p{i}", float(w), float(w)) for i, w in enumerate(rng.random(60) < p)]
    js.append(Judgement("bad", None, 0.4, "refusal (arm shown first)"))
    m = win_rate(js, n_boot=300, seed=cfg.seed).to_metrics(f"eval/{policy}/vs_sft")
    m.update({f"eval/{policy}/kl": 0.1 + 0.01 * cfg.seed, f"eval/{policy}/length": 31.0,
              f"eval/{policy}/judge_is_labeller": 1, f"eval/{policy}/prompts": 61})
    return m


def _evaluate_ppo(cfg, inputs, ctx):
    ctx.set_metrics(_eval_metrics(cfg, "ppo", 0.7 if cfg.reward.labels_from == "ai" else 0.6))


def _evaluate_dpo(cfg, inputs, ctx):
    ctx.set_metrics(_eval_metrics(cfg, "dpo", 0.5))


def _baseline(cfg, inputs, ctx):
    ctx.set_metrics({"baseline/prompts": 60})


def _stage(fn, inputs, reads=("seed", "reward.labels_from"), constitution=False):
    """A stand-in row of the stage table (the arm is reward.labels_from)."""
    return pipeline.StageSpec(fn, reads=lambda c: list(reads), inputs=lambda c: inputs,
                              constitution=lambda c: constitution)


FAKE_STAGES = {
    "labels": _stage(_labels, {"prompts": "prompts"}, reads=["reward.labels_from"], constitution=True),
    "reward": _stage(_reward, {"labels": "labels"}),
    "ppo": _stage(_ppo, {"reward": "reward"}),
    "dpo": _stage(_dpo, {"labels": "labels"}),
    "baseline": _stage(_baseline, {"prompts": "prompts"}, reads=["seed"]),
    "evaluate_ppo": _stage(_evaluate_ppo, {"ppo": "ppo", "baseline": "baseline"}),
    "evaluate_dpo": _stage(_evaluate_dpo, {"dpo": "dpo", "baseline": "baseline"}),
}
STAGE_NAMES = ["prompts", "labels", "reward", "ppo", "dpo", "baseline", "evaluate_ppo", "evaluate_dpo"]


def make_sweep(root: Path, store: Path) -> Path:
    """A 2-arm x 2-seed sweep folder shaped like `cai run -m reward.labels_from=ai,human seed=0,1`."""
    sweep = root / "sweep"
    with pytest.MonkeyPatch.context() as mp:
        for name, builder in FAKE_STAGES.items():
            mp.setitem(pipeline.STAGES, name, builder)
        job = 0
        for arm in ARMS:
            for seed in SEEDS:
                cfg = OmegaConf.structured(Config)
                cfg.seed, cfg.store.root = seed, str(store)
                cfg.data.max_prompts = 8
                cfg.experiment.name = "rlaif_vs_rlhf"
                cfg.experiment.stages = list(STAGE_NAMES)
                cfg.reward.labels_from = arm
                run_dir = sweep / str(job)
                pipeline.run_experiment(cfg, run_dir)
                (run_dir / ".hydra").mkdir()
                (run_dir / ".hydra" / "overrides.yaml").write_text(f"- reward.labels_from={arm}\n- seed={seed}\n")
                job += 1
    return sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    path = make_sweep(root, root / "store")
    write_report(path)
    return path


# ----------------------------------------------------------------------------- content
def test_runs_are_grouped_into_arms_over_seeds(sweep):
    data = collect(sweep)
    assert [r.name for r in data.runs] == ["0", "1", "2", "3"]
    assert data.varying == ["reward.labels_from", "seed"]
    assert [(a.name, len(a.runs)) for a in data.arms] == [("reward.labels_from=ai", 2), ("reward.labels_from=human", 2)]
    assert data.runs[0].overrides == ["reward.labels_from=ai", "seed=0"]
    assert set(data.runs[0].train_logs) == {"reward", "ppo", "dpo"}


def test_markdown_has_every_section_with_real_numbers(sweep):
    md = (sweep / "report.md").read_text()
    runs = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in range(4)]
    # the answer first: per arm and policy, in words, the mean win rate over seeds with a t interval
    answer = md.split("## Answer", 1)[1].split("\n## ", 1)[0]
    mean_ai = np.mean([runs[i]["eval/ppo/vs_sft/win_rate"] for i in (0, 1)])
    assert f"| reward.labels_from=ai | RLAIF · PPO | {mean_ai:.3g} [" in answer
    assert "| reward.labels_from=human | RLHF · PPO |" in answer and "| RLHF · DPO |" in answer
    assert "| 1920 (20 steps) |" in answer and "| 62 (20 steps) |" in answer  # labels used, steps
    assert "mean over 2 seeds with a Student-t interval" in answer
    assert "Judge: the tiny local model; n = 61 prompts; seeds 0, 1." in answer  # the forest plot's caption
    # single-run values carry their stage's own interval (the per-run fold, last)
    wr0 = runs[0]["eval/ppo/vs_sft/win_rate"]
    assert f"{wr0:.4g} [{runs[0]['eval/ppo/vs_sft/win_rate_ci_low']:.4g}, " in md.split("## All metrics")[1]
    titles = ["## Answer", "## Warnings", "## Head to head", "## Paired tests between arms", "## Label quality",
              "## Reward models on pair files", "## Training curves", "## Cost", "## Constitution",
              "## Config differences", "## Artifacts", "## Runs", "## All metrics"]
    assert [md.index(t) for t in titles] == sorted(md.index(t) for t in titles)  # in this order
    sets = md.split("## Reward models on pair files", 1)[1].split("\n## ", 1)[0]
    assert "| extra_pairs | reward model | 40 | 0.650 | [0.470, 0.760] | 0.080 |" in sets  # seed 1's row
    for pid in PRINCIPLES:
        assert f"| {pid} |" in md
    assert "| label/same_slot_rate | 0.8 (2 seeds) | — |" in md
    assert "| reward.labels_from | ai | ai | human | human |" in md
    # matching verified from run.json: prompts shared by all four runs, labels within an arm, the
    # baseline within a seed; where keys differ, the stage.json field that makes them differ
    keys = [json.loads((sweep / str(i) / "run.json").read_text())["artifacts"] for i in range(4)]
    assert keys[0]["labels"] == keys[1]["labels"] != keys[2]["labels"]
    assert keys[0]["baseline"] == keys[2]["baseline"] != keys[1]["baseline"] == keys[3]["baseline"]
    short = {st: [k.rsplit("-", 1)[1][:10] + "…" for k in (r[st] for r in keys)] for st in keys[0]}
    artifacts = md.split("## Artifacts")[1]
    table, folded = artifacts.split("*Every artifact and the runs that use it*")
    assert "1 of 8 stages are the same artifact in all 4 runs" in table
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert f"| 4 | 1 | one artifact for all 4 runs ({short['prompts'][0]}) | — |" in rows["prompts"]
    assert f"| all arms: one per seed (0: {short['baseline'][0]}, 1: {short['baseline'][1]}) | config: seed |" \
        in rows["baseline"]
    assert (f"| reward.labels_from=ai: one artifact for all seeds ({short['labels'][0]}); "
            "reward.labels_from=human: one artifact "
            f"for all seeds ({short['labels'][2]}) | config: reward.labels_from |") in rows["labels"]
    assert ("| 4 | 4 | none: one per run (all arms; seeds 0, 1) | config: reward.labels_from, seed; inputs: labels |"
            in rows["reward"])
    assert "inputs: baseline, ppo" in rows["evaluate_ppo"]
    assert list(rows)[1:] == ["prompts", "baseline", "labels", "dpo", "reward", "evaluate_dpo", "ppo",
                              "evaluate_ppo"]  # upstream first
    # the folded list has every full key and the runs that use it
    assert (f"| labels | {keys[0]['labels']} | 0 (reward.labels_from=ai, seed 0), 1 (reward.labels_from=ai, seed 1) |"
            in folded)
    # cost: the ai arm paid for its labels once (the second seed reused them)
    assert "| reward.labels_from=ai | 2 |" in md and "$0.1250" in md
    const = json.loads((sweep / "0" / "run.json").read_text())["constitution_hash"]
    assert const[:16] in md and "file unchanged" in md
    for name in ("forest_win_rate", "reward_vs_kl", "training_curves", "principle_agreement"):
        png = sweep / "report_assets" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"report_assets/{name}.png" in md


def test_artifact_sharing_is_described_per_arm_and_seed(tmp_path):
    """The sharing line of each pattern, from hand-made run records (no stage.json: said so)."""
    from cai.report.artifacts import artifacts_section
    from cai.report.runs import Arm, ReportData, RunRecord

    def key(stage, n):  # a well-formed key whose digest starts with n's two hex digits, repeated
        return f"{stage}-{f'{n:02x}' * 10}"

    def short(n):
        return f"{n:02x}" * 5 + "…"

    runs = []
    for arm in ("a", "b"):
        for seed in (0, 1, 2):
            artifacts = {"x": key("x", 1 if seed < 2 else 2) if arm == "a" else key("x", 10 + seed),
                         "y": key("y", 7)}
            if arm == "b":
                artifacts["z"] = key("z", 3)
            info = {"seed": seed, "artifacts": artifacts, "config": {"seed": seed, "tags": {"arm": arm}}}
            runs.append(RunRecord(tmp_path, f"{arm}{seed}", info, {}, {}))
    data = ReportData(tmp_path, runs, [Arm("tags.arm=a", runs[:3]), Arm("tags.arm=b", runs[3:])], ["seed"])
    section = artifacts_section(data)
    rows = {r[0]: r[1:] for r in section.tables[0].rows}
    assert rows["x"] == ["6", "5", f"a: 2 artifacts (seeds 0, 1: {short(1)}; seed 2: {short(2)}); "
                         f"b: one per seed (0: {short(10)}, 1: {short(11)}, 2: {short(12)})",
                         "(a run has no stages/x.json)"]
    assert rows["y"][2:] == [f"one artifact for all 6 runs ({short(7)})", "—"]
    assert rows["z"][2] == f"one artifact for the 3 runs that use it: b ({short(3)})"
    folded = {(r[0], r[1]): r[2] for r in section.details[0].rows}
    assert folded[("x", key("x", 1))] == "a0 (a, seed 0), a1 (a, seed 1)"
    assert folded[("y", key("y", 7))] == "all 6 runs"


def test_curves_are_picked_by_exact_name_and_a_shared_artifact_is_drawn_once(sweep, tmp_path):
    from cai.report.runs import Arm, ReportData, RunRecord
    from cai.report.sections import curve_panels

    panels, _ = curve_panels(collect(sweep))
    assert "PPO: KL to reference  (ppo/objective/kl)" in panels  # never crowded out by look-alike names
    assert not any("reward_failed" in t or "time/" in t or "clipfrac" in t for t in panels)
    kl = panels["PPO: KL to reference  (ppo/objective/kl)"]
    assert set(kl) == {"reward.labels_from=ai", "reward.labels_from=human"} and all(len(v) == 2 for v in kl.values())
    assert panels["DPO: loss  (dpo/loss)"]["reward.labels_from=ai"][0] == ([1.0], [0.69])  # one point: kept
    # two arms reading one SFT artifact and one held-out RM: one line each, named by both arms
    logs = {"sft": [{"step": 1, "sft/loss": 2.0}, {"step": 2, "sft/loss": 1.5}],
            "eval_reward": [{"step": 1, "rm/loss": 0.7}]}
    runs = [RunRecord(tmp_path, arm, {"seed": 0, "artifacts": {"sft": "sft-aa", "eval_reward": "eval_reward-bb"}},
                      {}, {}, train_logs=logs) for arm in ("a", "b")]
    shared, _ = curve_panels(ReportData(tmp_path, runs, [Arm("AI labels", runs[:1]), Arm("human labels", runs[1:])],
                                        ["tags.arm"]))
    assert list(shared["SFT: loss  (sft/loss)"]) == ["AI labels + human labels"]
    assert list(shared["Held-out RM (eval_reward): loss  (rm/loss)"]) == ["AI labels + human labels"]


def test_a_single_point_series_is_drawn():
    import io

    import matplotlib.image

    from cai.report.render import line_panels

    png = line_panels({"DPO: loss": {"arm": [([1.0], [0.69])]}}, colours={"arm": "#d62728"})
    pixels = matplotlib.image.imread(io.BytesIO(png))[..., :3]
    red = np.abs(pixels - np.array([0xD6, 0x27, 0x28]) / 255).max(axis=2) < 0.08
    assert red.sum() > 15, red.sum()  # its marker (and the legend's)


def test_runs_from_before_per_policy_evaluation_are_read_as_their_policy(sweep, tmp_path):
    """An older run has one `evaluate` artifact and eval/... metrics: they are eval/<eval.policy>/..."""
    from cai.report.runs import headline_evaluation

    run = tmp_path / "old"
    shutil.copytree(sweep / "0", run)
    info = json.loads((run / "run.json").read_text())
    key = info["artifacts"].pop("evaluate_ppo")
    del info["artifacts"]["evaluate_dpo"]
    info["artifacts"]["evaluate"] = key
    info["config"]["eval"]["policy"] = "ppo"
    (run / "run.json").write_text(json.dumps(info))
    metrics = json.loads((run / "metrics.json").read_text())
    old = {k.replace("eval/ppo/", "eval/"): v for k, v in metrics.items() if not k.startswith("eval/dpo/")}
    (run / "metrics.json").write_text(json.dumps(old))
    record = collect(run).runs[0]
    assert record.metrics["eval/ppo/vs_sft/win_rate"] == metrics["eval/ppo/vs_sft/win_rate"]
    assert "eval/vs_sft/win_rate" not in record.metrics
    assert headline_evaluation(info) == ("ppo", key)
    md = write_report(run)[0].read_text()
    assert "| — | RLAIF · PPO |" in md


def test_a_warning_that_holds_in_every_arm_is_said_once(sweep):
    from cai.report.headline import find_warnings

    found = find_warnings(collect(sweep))
    judge = [w for w in found if "judge_is_labeller" in w]
    assert judge == [judge[0]] and "(all arms)" in judge[0]
    slot = [w for w in found if "same_slot_rate" in w]  # only the arm trained on AI labels
    assert len(slot) == 1 and "(arm reward.labels_from=ai)" in slot[0]
    assert not any("PPO steps" in w for w in found)  # equal in both arms


def test_rule_grade_column_and_line_only_with_eval_truth(sweep, tmp_path):
    """eval.truth's metrics: the mean grade as the headline column "rule grade", and a line with the
    baseline's grade and every side's share at the rule's lowest grade; no column without them."""
    from cai.report.headline import answer_section
    from cai.report.runs import Arm, ReportData, RunRecord

    metrics = {"eval/ppo/vs_sft/win_rate": 0.69, "eval/ppo/vs_sft/n": 92.0, "eval/ppo/truth/mean": 1.804,
               "eval/ppo/truth/mean_ci_low": 1.652, "eval/ppo/truth/mean_ci_high": 1.891,
               "eval/ppo/truth/lowest_rate": 0.0652, "eval/ppo/truth/lowest_rate_ci_low": 0.0302,
               "eval/ppo/truth/lowest_rate_ci_high": 0.135, "eval/baseline/truth/mean": 1.413,
               "eval/baseline/truth/mean_ci_low": 1.283, "eval/baseline/truth/mean_ci_high": 1.533,
               "eval/baseline/truth/lowest_rate": 0.1, "eval/baseline/truth/lowest_rate_ci_low": 0.05,
               "eval/baseline/truth/lowest_rate_ci_high": 0.2}
    config = {"seed": 0, "eval": {"baseline": "sft", "truth": "cai.testing.preference_task:task_grade",
                                  "truth_lowest": 0.0}, "reward": {"labels_from": "ai"}}
    run = RunRecord(tmp_path, "0", {"config": config, "seed": 0}, metrics, {})
    section = answer_section(ReportData(tmp_path, [run], [Arm("a", [run])], []))
    table = section.tables[0]
    assert table.columns[-3:] == ["rule grade", "labels used", "$ per run"]
    assert table.rows[0][table.columns.index("rule grade")] == "1.8 [1.65, 1.89]"
    assert ("Rule grade: the replies graded by the known rule cai.testing.preference_task:task_grade (eval.truth), "
            "mean [95% interval]; the SL-CAI policy (baseline) 1.41 [1.28, 1.53]. Share of replies at its lowest "
            "grade (0 or below): baseline 0.1 [0.05, 0.2]; RLAIF · PPO 0.0652 [0.0302, 0.135].") in section.paragraphs
    # the sweep's runs have no eval.truth: no column, no line
    answer = (sweep / "report.md").read_text().split("## Answer", 1)[1].split("\n## ", 1)[0]
    assert "rule grade" not in answer and "Rule grade" not in answer


def test_html_is_self_contained(sweep):
    html = (sweep / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 4
    assert "report_assets" not in html and "http://" not in html and "https://" not in html
    md_tables = sum(line.startswith("|---") for line in (sweep / "report.md").read_text().splitlines())
    assert html.count("<table>") == md_tables > 8


def test_sections_without_data_say_so(tmp_path, sweep):
    run = tmp_path / "one"
    shutil.copytree(sweep / "2", run)  # the human arm: no per-principle agreement
    info = json.loads((run / "run.json").read_text())
    info["store"] = str(tmp_path / "moved-store")  # the store is gone: no train logs
    (run / "run.json").write_text(json.dumps(info))
    md_path, _ = write_report(run)
    md = md_path.read_text()
    assert "No per-principle agreement" in md and "Artifacts not found in the store" in md
    assert "No training curves" in md and "One run: there is no other run" in md
    assert "eval/ppo/vs_sft/win_rate" in md and "| RLHF · PPO |" in md  # what exists is still shown


# ----------------------------------------------------------------------------- chromium
PROBE = """<script>
window.addEventListener('load', () => {
  document.querySelectorAll('details').forEach(d => { d.open = true; });  // folded tables too
  const seen = el => { const r = el.getBoundingClientRect(); const s = getComputedStyle(el);
    return r.width > 0 && r.height > 0 && s.display !== 'none' && s.visibility !== 'hidden'; };
  const tables = [...document.querySelectorAll('table')];
  const imgs = [...document.querySelectorAll('img')];
  const out = {tables: tables.length, tables_visible: tables.filter(seen).length,
               imgs: imgs.length, imgs_decoded: imgs.filter(i => i.complete && i.naturalWidth > 100).length,
               imgs_visible: imgs.filter(seen).length,
               rows: document.querySelectorAll('tbody tr').length};
  document.body.setAttribute('data-probe', JSON.stringify(out));
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("chromium is not installed (apt-get install -y chromium); the HTML was not rendered")


def _run_chromium(exe: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={tmp / 'chromium-profile'}"]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120)


def test_html_renders_in_headless_chromium(sweep, tmp_path):
    import matplotlib.image

    exe = _chromium()
    html = (sweep / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", PROBE + "</body>"))
    shot = tmp_path / "shot.png"
    dom = _run_chromium(exe, tmp_path, "--window-size=1280,2200", f"--screenshot={shot}", "--dump-dom",
                        probe.as_uri())  # one launch: the DOM after load, and what it looks like
    assert dom.returncode == 0 and shot.is_file(), dom.stderr[-2000:]
    found = json.loads(dom.stdout.split("data-probe=\"")[1].split('"')[0].replace("&quot;", '"'))
    assert found["tables"] == html.count("<table>") and found["tables_visible"] == found["tables"]
    assert found["imgs"] == found["imgs_decoded"] == found["imgs_visible"] == 4
    assert found["rows"] > 20
    pixels = matplotlib.image.imread(str(shot))[..., :3]
    ink = (pixels.mean(axis=2) < 0.9).mean()  # share of non-white pixels
    rgb = (pixels * 255).astype(np.uint32)
    colours = len(np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]))
    assert ink > 0.03 and colours > 50, (ink, colours)  # text, tables and plots, not a blank page
    blue = np.abs(pixels - np.array([0x1F, 0x77, 0xB4]) / 255).max(axis=2) < 0.05  # the first arm's colour
    assert blue.sum() > 500, blue.sum()


# what a reader sees in the first screen (1400x900): the answer and its forest plot; the rest
FIRST_SCREEN = """<script>
window.addEventListener('load', () => {
  const box = el => { if (!el) return null; const r = el.getBoundingClientRect();
    return {top: r.top, bottom: r.bottom, left: r.left, right: r.right, width: r.width, height: r.height}; };
  const ink = img => {  // share of the image's pixels that are not near-white
    const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
    const g = c.getContext('2d'); g.drawImage(img, 0, 0);
    const d = g.getImageData(0, 0, c.width, c.height).data; let n = 0;
    for (let i = 0; i < d.length; i += 4) if (d[i] < 230 || d[i + 1] < 230 || d[i + 2] < 230) n++;
    return c.width * c.height ? n / (c.width * c.height) : 0; };
  const q = s => document.querySelector(s);
  const out = {answer: box(q('#answer table')), forest: box(q('#fig-forest_win_rate img')),
               reward_kl: box(q('#fig-reward_vs_kl img')),
               warnings: [...document.querySelectorAll('.warnings li')].map(li => li.textContent),
               curves: q('#fig-training_curves figcaption') ? q('#fig-training_curves figcaption').textContent : '',
               imgs: [...document.querySelectorAll('img')].map(i => [i.closest('figure').id, i.naturalWidth, ink(i)])};
  document.body.setAttribute('data-probe', JSON.stringify(out));
});
</script>"""


def first_screen(html_file: Path, tmp: Path, shot: Path) -> dict:
    """Render ``html_file`` in headless Chromium at 1400x900; what the probe measured, and a screenshot."""
    probe = tmp / f"{html_file.parent.name}-probe.html"
    probe.write_text(html_file.read_text().replace("</body>", FIRST_SCREEN + "</body>"))
    dom = _run_chromium(_chromium(), tmp, "--window-size=1400,900", f"--screenshot={shot}", "--dump-dom",
                        probe.as_uri())
    assert dom.returncode == 0 and shot.is_file(), dom.stderr[-2000:]
    import html as html_lib

    return json.loads(html_lib.unescape(dom.stdout.split('data-probe="')[1].split('"')[0]))


def check_first_screen(found: dict, warnings: list[str]) -> None:
    for what in ("answer", "forest"):  # the headline block and the forest plot: whole, in the first screen
        b = found[what]
        assert b and b["height"] > 40 and 0 <= b["top"] and b["bottom"] <= 900 and b["right"] <= 1400, (what, b)
    for needle in warnings:  # the warnings box lists what was measured
        assert any(needle in w for w in found["warnings"]), (needle, found["warnings"])
    assert "ppo/objective/kl" in found["curves"] and found["reward_kl"]  # the KL curve exists
    assert found["imgs"] and all(w > 100 and ink > 0.01 for _, w, ink in found["imgs"]), found["imgs"]


def test_first_screen_answers_and_warns_in_chromium(sweep, tmp_path):
    found = first_screen(sweep / "report.html", tmp_path, tmp_path / "sweep.png")
    check_first_screen(found, ["judge_is_labeller = 1", "label/same_slot_rate = 0.8", "label/position_consistency",
                               "label/first_slot_rate = 0.9", "label/failed = 2 of 64", "ppo/warnings = 3",
                               "(rm/data/used): reward.labels_from=ai 62, reward.labels_from=human 1920",
                               "includes 0.5"])
    assert len(found["imgs"]) == 4


@pytest.mark.slow  # two tiny `cai run`s: about 1-2 minutes on 2 cores
def test_real_quickstart_and_two_arm_reports_open_with_the_answer(tmp_path, shared_data_dir):
    """`cai run` (the quickstart) and `cai run data=hh_rlhf` (plus the human-label arm), tiny budgets:
    each report.html shows the answer and the forest plot in the first screen, lists exactly the
    warnings its metrics call for, draws the KL curve, and every image has content."""
    from test_pipeline import TINY, cai

    from cai.report.headline import find_warnings

    speed = [*TINY, "critique.max_new_tokens=6", "ppo.steps=2", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=4",
             "ppo.max_new_tokens=6", "eval.max_new_tokens=6", "eval.max_prompts=6"]
    hh = shared_data_dir / "hh-rlhf" / "harmless-base-dev.jsonl.gz"
    for name, extra in (("quickstart", []), ("two_arms", ["data=hh_rlhf", f"data.human.path={hh}",
                                                          "data.human.limit=48"])):
        res = cai("run", *extra, *speed, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path, store=tmp_path / "store")
        assert res.returncode == 0, res.stderr[-3000:]
        data = collect(tmp_path / name)
        assert len(data.arms) == (2 if extra else 1)
        found = first_screen(tmp_path / name / "report.html", tmp_path, tmp_path / f"{name}.png")
        expected = find_warnings(data)
        assert found["warnings"] == expected  # the box is the measured list, in order
        # the quickstart's held-out evaluator is not its labeller: that warning only where measured
        labeller = any(v == 1 for r in data.runs for k, v in r.metrics.items() if k.endswith("/judge_is_labeller"))
        needles = ["judge_is_labeller = 1"] if labeller else []
        used = {a.name: a.runs[0].metrics.get("rm/data/used") for a in data.arms}
        if extra and len(set(used.values())) > 1:
            needles.append("Unequal reward-model labels between matched arms (rm/data/used)")
        check_first_screen(found, needles)
        md = (tmp_path / name / "report.md").read_text()
        assert "RLAIF · PPO" in md and "RLAIF · DPO" in md and ("RLHF · DPO" in md) == bool(extra)
        assert "| rule grade |" in md  # eval.truth: the known rule's column, within the first screen's width


# ----------------------------------------------------------------------------- cli, errors, callback
def test_main_writes_elsewhere_and_reports_user_errors(sweep, tmp_path, capsys):
    assert main([str(sweep), "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.html").is_file()
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no run found" in capsys.readouterr().err


def test_corrupt_run_file_names_file_and_line(tmp_path, sweep):
    run = tmp_path / "r"
    shutil.copytree(sweep / "0", run)
    (run / "metrics.json").write_text('{\n "a": 1,\n oops\n}')
    with pytest.raises(DataError, match=r"metrics.json:3: not valid JSON"):
        collect(run)


def test_callback_writes_into_the_sweep_folder_and_never_raises(sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("report*"))
    ReportCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(copy)}}}))
    assert (copy / "report.html").is_file() and (copy / "report.md").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    ReportCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(empty)}}}))
    assert not (empty / "report.html").exists()
    ReportCallback(on_run=False).on_run_end(OmegaConf.create({"hydra": {"runtime": {"output_dir": str(copy / "0")}}}))
    assert not (copy / "0" / "report.html").exists()
    ReportCallback().on_run_end(OmegaConf.create({"hydra": {"runtime": {"output_dir": str(copy / "0")}}}))
    assert (copy / "0" / "report.html").is_file()


def test_callback_writes_the_report_when_the_head_to_head_fails(sweep, tmp_path, caplog):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("report*"))
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(copy)}}})
    with caplog.at_level("INFO"):
        ReportCallback(head_to_head=False).on_multirun_end(cfg)
    assert "head to head" not in caplog.text and (copy / "report.md").is_file()
    (copy / "report.md").unlink()
    with caplog.at_level("INFO"):  # the stand-in runs have no policy_model for the tiny judge: logged, not raised
        ReportCallback().on_multirun_end(cfg)
    assert "head to head: could not compare the arms" in caplog.text and "policy_model" in caplog.text
    assert not (copy / "head_to_head.json").exists()
    assert "run cai compare" in (copy / "report.md").read_text()


def test_head_to_head_matrices_per_seed_and_over_seeds(sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("report*"))
    row = {"arm_a": "reward.labels_from=ai", "arm_b": "reward.labels_from=human", "wins": 5, "ties": 2, "losses": 2,
           "invalid": 1, "n": 10}
    rows = [{**row, "seed": 0, "win_rate": 0.6, "ci_low": 0.5, "ci_high": 0.7},
            {**row, "seed": 1, "win_rate": 0.8, "ci_low": 0.7, "ci_high": 0.9}]
    (copy / "head_to_head.json").write_text(json.dumps({"version": 1, "rows": rows, "skipped": []}))
    md = write_report(copy)[0].read_text()
    section = md.split("## Head to head", 1)[1].split("\n## ", 1)[0]
    assert "| reward.labels_from=ai | — | 0.6 [0.5, 0.7] |" in section
    assert "| reward.labels_from=human | 0.4 [0.3, 0.5] | — |" in section  # the mirror cell
    assert "| reward.labels_from=human | 0.2 [0.1, 0.3] | — |" in section
    # over 2 seeds: mean 0.7, Student-t half width 12.706 * 0.1414 / sqrt(2) = 1.271
    assert "| reward.labels_from=ai | — | 0.7 [-0.571, 1.97] (2 seeds) |" in section
    paired = md.split("## Paired tests between arms", 1)[1].split("\n## ", 1)[0]
    assert "No evaluate samples" in paired  # the stand-in evaluate stage writes metrics only


def test_real_sweep_through_cai_run_gets_its_report(tmp_path):
    # the foundation stages only (the full quickstart is covered by tests/test_pipeline.py)
    tiny = ["experiment.stages=[responses]", "data.max_prompts=4", "sampling.max_new_tokens=4",
            "sampling.batch_size=4", "policy.tiny.n_layer=1",
            "policy.tiny.n_embd=32", "policy.tiny.n_head=2", "policy.tiny.vocab_size=512"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cai.cli", "run", "-m", *tiny, "seed=0,1", f"hydra.sweep.dir={tmp_path}/sweep",
           f"store.root={tmp_path}/store"]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    md = (tmp_path / "sweep" / "report.md").read_text()  # written by ReportCallback.on_multirun_end
    assert "2 run(s) in 1 arm(s)" in md and "| seed | 0 | 1 |" in md
    assert "2 of 3 stages are the same artifact in all 2 runs" in md
    runs = [json.loads((tmp_path / "sweep" / str(i) / "run.json").read_text())["artifacts"] for i in (0, 1)]
    assert runs[0]["policy_model"] in md and runs[0]["responses"] in md and runs[1]["responses"] in md
    assert "No evaluation yet" in md and "No training curves" in md
    assert "sample/mean_new_tokens" in md
    assert main([str(tmp_path / "sweep" / "0")]) == 0  # `cai report RUN_DIR` on one real run
    assert "prompts-" in (tmp_path / "sweep" / "0" / "report.md").read_text()
