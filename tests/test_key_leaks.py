"""A key written into ``judge.base_url`` (``http://user:KEY@host/v1``, ``?api_key=KEY``), or echoed
back by a server inside its answers, reaches no file a run writes (run.json, metrics.json,
stages/*.json, stage.json, labels.jsonl and every other artifact, cai.log, .hydra/*.yaml, the
report, the judge cache) and no console output (issue #11 item 9).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from cai.judges.cache import JudgeCache
from cai.secrets import (
    SCRUBBED,
    SecretFilter,
    redact_text,
    redact_urls,
    register_secret,
    scrub_secrets,
    url_secrets,
)
from cai.testing.servers import FakeOpenAIServer

KEY = "sk-cai-url-SECRET-5e4d3c2b1a09f8e7"


# ---- the rules ------------------------------------------------------------------------------------
def test_url_credentials_are_cut_out_of_any_text():
    text = ("judge.base_url=http://user:sk-abc123@host:8000/v1 then https://tok-xyz@h.example/v1 and "
            "https://h/v1?api-version=2&api_key=sk-q1&key=AIza9 keeps http://h/v1?page=2 and a@b.c")
    assert redact_urls(text) == (
        "judge.base_url=http://user:***@host:8000/v1 then https://***@h.example/v1 and "
        "https://h/v1?api-version=2&api_key=***&key=*** keeps http://h/v1?page=2 and a@b.c")
    assert redact_urls(r"- judge.base_url=http\://u\:sk-abc@h\:8/v1") == r"- judge.base_url=http\://u\:***@h\:8/v1"
    assert url_secrets("http://u:p%40ss@h/v1?api_key=k1&x=1") == ["p%40ss", "p@ss", "k1"]
    assert url_secrets("http://h:8/v1") == [] and url_secrets(None) == []


def test_scrub_and_log_filter_cut_urls_and_registered_secrets():
    register_secret("sk-registered-0123456789")
    cfg = {"judge": {"base_url": "http://u:sk-zzz@h/v1", "api_key_env": "MY_VAR",
                     "note": "said sk-registered-0123456789 twice"}}
    assert scrub_secrets(cfg, names=False) == {"judge": {"base_url": "http://u:***@h/v1", "api_key_env": "MY_VAR",
                                                         "note": f"said {SCRUBBED} twice"}}
    assert scrub_secrets(cfg)["judge"]["api_key_env"] == SCRUBBED  # a secret-named key's value
    record = logging.LogRecord("cai", logging.INFO, __file__, 1, "url %s key %s", ("http://u:pw@h/", "x"), None)
    SecretFilter().filter(record)
    assert record.getMessage() == "url http://u:***@h/ key x"
    assert redact_text("sk-registered-0123456789") == SCRUBBED


# ---- a whole run ----------------------------------------------------------------------------------
def test_a_key_in_the_base_url_or_echoed_in_answers_reaches_no_file(tmp_path):
    stages = "[responses,revisions,sft,policy_pairs,ai_labels]"
    echo = "{label}. Answered for the holder of " + KEY  # the server echoes the key in every choice
    with FakeOpenAIServer(api_key=KEY, answer_style=echo) as srv:
        url = srv.base_url.replace("http://", f"http://user:{KEY}@")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CAI_STORE": str(tmp_path / "store")}
        env.pop("OPENAI_API_KEY", None)
        cmd = [sys.executable, "-m", "cai.cli", "run", "judge=openai_gpt4_1_mini", f"judge.base_url={url}",
               "judge.api_key_env=null", "judge.top_logprobs=0", f"experiment.stages={stages}",
               "data.max_prompts=6", "sampling.max_new_tokens=6", "critique.max_new_tokens=6", "sft.epochs=1",
               f"store.root={tmp_path / 'store'}", f"hydra.run.dir={tmp_path / 'run'}"]
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert srv.count() > 0 and all(r.status == 200 for r in srv.records)  # the URL's key authenticated

    run = tmp_path / "run"
    answers = "".join(v for _, v in JudgeCache(tmp_path / "store" / "judge_cache.sqlite").dump())
    assert "Answered for the holder of ***" in answers  # the echoed answer is kept, its key is not
    assert next((tmp_path / "store").rglob("labels.jsonl")).stat().st_size > 0
    assert "user:***@127.0.0.1" in json.loads((run / "run.json").read_text())["config"]["judge"]["base_url"]
    assert (run / ".hydra" / "overrides.yaml").is_file() and (run / "cai.log").is_file()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    leaks = [str(p) for p in files if any(s in p.read_bytes() for s in (KEY.encode(), KEY[-16:].encode()))]
    assert not leaks
    assert KEY not in done.stdout + done.stderr and KEY[-16:] not in done.stdout + done.stderr
    assert Path(run / "report.md").is_file()


def test_a_sweep_with_a_key_in_the_base_url_leaks_it_nowhere(tmp_path):
    """A sweep (cai run -m): Hydra escapes the overrides it writes (``http\\://u\\:KEY@``) and its
    launcher logs them before any job starts; neither reaches a file or the console."""
    url = f"http://user:{KEY}@127.0.0.1:9/v1"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "cai.cli", "run", "-m", "seed=0,1", f"judge.base_url={url}", "judge.backend=openai",
           "judge.model=m", "judge.api_key_env=null", "experiment.stages=[prompts]", "data.max_prompts=2",
           f"store.root={tmp_path / 'store'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    overrides = (tmp_path / "sweep" / "0" / ".hydra" / "overrides.yaml").read_text()
    assert "judge.base_url=http\\://user\\:***@127.0.0.1" in overrides
    assert (tmp_path / "sweep" / "multirun.yaml").is_file() and (tmp_path / "sweep" / "report.md").is_file()
    leaks = [str(p) for p in tmp_path.rglob("*") if p.is_file() and KEY[-16:].encode() in p.read_bytes()]
    assert not leaks and KEY[-16:] not in done.stdout + done.stderr
