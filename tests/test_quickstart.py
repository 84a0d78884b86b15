"""``mie quickstart``: its config, its stage configs (every shipped file loads into its stage's config class),
and the report's arithmetic. The whole quickstart is `make quickstart` (minutes of CPU), not a unit test."""
from __future__ import annotations

import pytest

from mie.launch import config as config_lib
from mie.launch import quickstart as qs
from mie.launch.config import ConfigError


def test_every_shipped_stage_config_loads():
    from mie.finetune.loop import FinetuneConfig
    from mie.pretrain.train import PretrainConfig
    from mie.shards.backtranslate import BacktranslateConfig
    from mie.shards.build import BuildConfig
    from mie.shards.fit_detector import FitDetectorConfig
    from mie.shards.fit_prompter import FitPrompterConfig
    from mie.shards.pseudolabel import PseudolabelConfig
    from mie.shards.tiny_diffusion import TinyDiffusionConfig
    from mie.shards.toy import ToyConfig

    for name, cls in (("quickstart.toml", qs.QuickstartConfig), ("toy.toml", ToyConfig), ("build.toml", BuildConfig),
                      ("tiny-diffusion.toml", TinyDiffusionConfig), ("backtranslate.toml", BacktranslateConfig),
                      ("fit-detector.toml", FitDetectorConfig), ("fit-prompter.toml", FitPrompterConfig),
                      ("pseudolabel.toml", PseudolabelConfig), ("pretrain.toml", PretrainConfig),
                      ("finetune.toml", FinetuneConfig)):
        cfg = config_lib.load(cls, qs.config_path(name))
        assert cfg is not None, name
    # every path inside DIR is relative, so that the stages write nowhere else
    pre = config_lib.load(PretrainConfig, qs.config_path("pretrain.toml"))
    assert not pre.out.startswith("/") and all(not s.dir.startswith("/") for s in pre.data.sets)


def test_bad_quickstart_settings_are_refused():
    with pytest.raises(ConfigError, match="tasks"):
        config_lib.from_dict(qs.QuickstartConfig, {"tasks": ["twitter_ner"]})
    with pytest.raises(ConfigError, match="ranks"):
        config_lib.from_dict(qs.QuickstartConfig, {"ranks": 0})
    with pytest.raises(ConfigError):
        config_lib.from_dict(qs.QuickstartConfig, {"seed": 3})  # unknown key (seeds is a list)


def _res(f1: float, task: str) -> dict:
    return {"test": {section: {"f1": f1} for section, _ in qs.METRICS[task]}}


def test_report_table_says_helps_only_beyond_the_seed_spread(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "report").mkdir()
    cfg = config_lib.from_dict(qs.QuickstartConfig, {"seeds": [0, 1, 2], "tasks": ["gmner", "mnre"]})
    results = {
        # gmner: means 60 vs 50, spreads 4 and 2 → helps
        "gmner": {"pretrained": {0: _res(58, "gmner"), 1: _res(60, "gmner"), 2: _res(62, "gmner")},
                  "random": {0: _res(49, "gmner"), 1: _res(50, "gmner"), 2: _res(51, "gmner")}},
        # mnre: means 52 vs 50, but the pretrained spread is 6 → does not help
        "mnre": {"pretrained": {0: _res(49, "mnre"), 1: _res(52, "mnre"), 2: _res(55, "mnre")},
                 "random": {0: _res(50, "mnre"), 1: _res(50, "mnre"), 2: _res(50, "mnre")}},
    }
    quality = {"pretraining set": {"map50": 0.91, "top1": 0.84, "top1_n": 100}}
    path = qs.write_report(cfg, results, quality, {"world": 1.0, "pretrain": 2.5})
    text = path.read_text()
    rows = {line.split(" | ")[0].strip("|* "): line for line in text.splitlines()
            if line.startswith(("| **gmner", "| **mnre"))}
    assert "| 60.00 | 50.00 | +10.00 | 4.00 / 2.00 | yes |" in rows["gmner"]
    assert "| 52.00 | 50.00 | +2.00 | 6.00 / 0.00 | no |" in rows["mnre"]
    assert "58.00, 60.00, 62.00" in rows["gmner"]
    assert "mAP50 on the pretraining pairs: 0.910" in text and "top-1: 0.840" in text
    assert "| **total** | **3.5** |" in text
    assert (tmp_path / "report" / "report.md").is_file()
