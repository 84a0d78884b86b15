"""TOML → dataclasses, overrides, one-line errors, and the CLI's handling of them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from conftest import cli, make_twitter_corpus, write_build_config
from mie.launch import config as config_lib
from mie.launch.config import ConfigError
from mie.shards.build import BuildConfig, OutputConfig, SourceConfig


@dataclass
class Inner:
    name: str
    size: int = 3
    ratio: float = 0.5
    tags: list[str] = field(default_factory=list)
    mode: Literal["fast", "slow"] = "fast"
    limit: int | None = None
    on: bool = False


@dataclass
class Top:
    inner: Inner
    seed: int = 0
    extra: dict[str, str] = field(default_factory=dict)


def write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def one_line_error(excinfo: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, f"error message is not one line: {msg!r}"
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------------------------------------- load


def test_load_builds_nested_dataclasses(tmp_path):
    p = write(tmp_path, """
seed = 7
[inner]
name = "vorra"
size = 12
ratio = 2          # an integer is fine where a float is expected
tags = ["a", "b"]
mode = "slow"
on = true
[extra]
k = "v"
""")
    cfg = config_lib.load(Top, p)
    assert cfg == Top(inner=Inner(name="vorra", size=12, ratio=2.0, tags=["a", "b"], mode="slow", on=True),
                      seed=7, extra={"k": "v"})
    assert isinstance(cfg.inner.ratio, float)
    assert cfg.inner.limit is None  # default kept


def test_overrides_ints_lists_bare_strings(tmp_path):
    p = write(tmp_path, '[inner]\nname = "vorra"\n')
    cfg = config_lib.load(Top, p, ["inner.size=42", 'inner.tags=["x", "y"]', "inner.name=runs/some-dir",
                                   "seed=-3", "inner.limit=5", "inner.ratio=0.25", "extra.key=skeel",
                                   'inner.mode="slow"'])
    assert cfg.inner.size == 42 and isinstance(cfg.inner.size, int)
    assert cfg.inner.tags == ["x", "y"]
    assert cfg.inner.name == "runs/some-dir"  # bare word → string
    assert cfg.seed == -3
    assert cfg.inner.limit == 5
    assert cfg.inner.ratio == 0.25
    assert cfg.extra == {"key": "skeel"}
    assert cfg.inner.mode == "slow"


def test_override_wins_over_file_and_can_supply_required_key(tmp_path):
    p = write(tmp_path, '[inner]\nname = "vorra"\nsize = 1\n')
    assert config_lib.load(Top, p, ["inner.size=2"]).inner.size == 2
    # No file at all: overrides alone can build the config.
    assert config_lib.load(Top, None, ["inner.name=plint"]).inner.name == "plint"


def test_override_value_with_equals_sign(tmp_path):
    p = write(tmp_path, '[inner]\nname = "vorra"\n')
    assert config_lib.load(Top, p, ["inner.name=a=b"]).inner.name == "a=b"


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_key(tmp_path):
    p = write(tmp_path, '[inner]\nname = "vorra"\nnmae = "typo"\n')
    with pytest.raises(ConfigError) as e:
        config_lib.load(Top, p)
    one_line_error(e, str(p), "inner.nmae", "unknown key")


def test_unknown_top_level_table(tmp_path):
    p = write(tmp_path, '[inner]\nname = "vorra"\n[outer]\nx = 1\n')
    with pytest.raises(ConfigError) as e:
        config_lib.load(Top, p)
    one_line_error(e, str(p), "'outer'")


@pytest.mark.parametrize("body, key", [
    ('[inner]\nname = "vorra"\nsize = "big"\n', "inner.size"),
    ('[inner]\nname = "vorra"\nsize = 1.5\n', "inner.size"),
    ('[inner]\nname = "vorra"\nsize = true\n', "inner.size"),   # a bool is not an int
    ('[inner]\nname = 3\n', "inner.name"),
    ('[inner]\nname = "vorra"\ntags = "solo"\n', "inner.tags"),
    ('[inner]\nname = "vorra"\ntags = [1]\n', "inner.tags[0]"),
    ('[inner]\nname = "vorra"\nmode = "medium"\n', "inner.mode"),
    ('[inner]\nname = "vorra"\nlimit = "none"\n', "inner.limit"),
    ('inner = 5\n', "inner"),
    ('seed = 1\n[inner]\nname = "vorra"\n[extra]\nk = 1\n', "extra.k"),
])
def test_wrong_type(tmp_path, body, key):
    p = write(tmp_path, body)
    with pytest.raises(ConfigError) as e:
        config_lib.load(Top, p)
    one_line_error(e, str(p), f"'{key}'", "expected")


def test_missing_required_key(tmp_path):
    p = write(tmp_path, '[inner]\nsize = 3\n')
    with pytest.raises(ConfigError) as e:
        config_lib.load(Top, p)
    one_line_error(e, str(p), "inner.name", "missing")
    p2 = write(tmp_path, 'seed = 3\n', "noinner.toml")
    with pytest.raises(ConfigError) as e:
        config_lib.load(Top, p2)
    one_line_error(e, str(p2), "'inner'", "missing")


def test_missing_config_file(tmp_path):
    p = tmp_path / "nowhere" / "absent.toml"
    with pytest.raises(ConfigError) as e:
        config_lib.load(Top, p)
    one_line_error(e, str(p), "not found")


def test_invalid_toml(tmp_path):
    p = write(tmp_path, '[inner\nname = "vorra"\n')
    with pytest.raises(ConfigError) as e:
        config_lib.load(Top, p)
    one_line_error(e, str(p), "TOML")


@pytest.mark.parametrize("override, needle", [
    ("inner.size=notanumber", "inner.size"),   # bare word → string → wrong type for an int
    ("inner.bogus=1", "inner.bogus"),          # unknown key
    ("inner.size", "inner.size"),              # no '='
    ("=5", "=5"),                              # no key
    ("inner.name.deeper=1", "inner.name"),     # a string is not a table
    ('inner.tags=[1, "x"]', "inner.tags"),     # mixed list, and its items must be strings
])
def test_bad_override(tmp_path, override, needle):
    p = write(tmp_path, '[inner]\nname = "vorra"\n')
    with pytest.raises(ConfigError) as e:
        config_lib.load(Top, p, [override])
    one_line_error(e, str(p), needle)


def test_validate_errors_name_file_and_key(tmp_path):
    p = write_build_config(tmp_path / "b.toml", {"format": "twitter", "root": str(tmp_path)},
                           {"dir": str(tmp_path / "out")})
    with pytest.raises(ConfigError) as e:
        config_lib.load(BuildConfig, p, ["output.samples_per_shard=0"])
    one_line_error(e, str(p), "output.samples_per_shard")
    with pytest.raises(ConfigError) as e:
        config_lib.load(BuildConfig, p, ["output.jpeg_quality=101"])
    one_line_error(e, str(p), "output.jpeg_quality")
    with pytest.raises(ConfigError) as e:
        config_lib.load(BuildConfig, p, ["source.format=docx"])
    one_line_error(e, str(p), "source.format", "twitter")


# ---------------------------------------------------------------------------------------------- save


def test_save_load_round_trip(tmp_path):
    cfg = BuildConfig(
        source=SourceConfig(format="gmner", root="corp/gm", name="gm1", image_dir="imgs", require_images=True,
                            splits=["train", "test"], split_files={"test": "txt/other.txt"},
                            options={"xml_dir": "xml2"}),
        output=OutputConfig(dir="out/x", samples_per_shard=17, max_image_side=99, jpeg_quality=70, workers=2),
    )
    path = tmp_path / "sub" / "saved.toml"
    config_lib.save(cfg, path)
    assert config_lib.load(BuildConfig, path) == cfg
    assert not list(path.parent.glob("*.tmp"))

    top = Top(inner=Inner(name="n", limit=None, tags=["q"], mode="slow", ratio=1.5), seed=9, extra={"a": "b"})
    config_lib.save(top, tmp_path / "top.toml")  # None is dropped (TOML has no null) and comes back as default
    assert config_lib.load(Top, tmp_path / "top.toml") == top
    assert dataclasses.asdict(config_lib.load(Top, tmp_path / "top.toml")) == dataclasses.asdict(top)


# ---------------------------------------------------------------------------------------------- CLI


def assert_cli_user_error(proc, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {proc.stderr!r}"
    assert lines[0].startswith("mie: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def small_cfg(tmp_path):
    root, image_dir = make_twitter_corpus(tmp_path / "corpus", {"train": 2, "dev": 1, "test": 1}, images=False)
    return write_build_config(tmp_path / "build.toml", {"format": "twitter", "root": str(root)},
                              {"dir": str(tmp_path / "out")})


def test_cli_bad_override_is_one_line(small_cfg, tmp_path):
    proc = cli("shards", "build", str(small_cfg), "output.bogus=1")
    assert_cli_user_error(proc, str(small_cfg), "output.bogus")
    assert not (tmp_path / "out").exists()


def test_cli_missing_split_file(small_cfg, tmp_path):
    (tmp_path / "corpus" / "valid.txt").unlink()
    proc = cli("shards", "build", str(small_cfg))
    assert_cli_user_error(proc, "valid.txt", "dev")


def test_cli_missing_corpus_root(small_cfg, tmp_path):
    proc = cli("shards", "build", str(small_cfg), f"source.root={tmp_path / 'gone'}")
    assert_cli_user_error(proc, "source.root", str(tmp_path / "gone"))


def test_cli_missing_config_file(tmp_path):
    proc = cli("shards", "build", str(tmp_path / "absent.toml"))
    assert_cli_user_error(proc, str(tmp_path / "absent.toml"), "not found")
