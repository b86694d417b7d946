"""Config loading and validation: every user mistake is one line, names the value and the fix, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from phalanx.cli import main
from phalanx.config import load_config
from phalanx.errors import ConfigError
from phalanx.parallel import validate
from tests.helpers import CONFIG, REPO, run_phalanx


def test_yaml_and_overrides_merge():
    cfg = load_config(CONFIG, ["train.steps=7", "optim.lr=0.01", "model.tie_embeddings=true"])
    assert cfg.run.name == "tiny" and cfg.train.steps == 7 and cfg.optim.lr == 0.01 and cfg.model.tie_embeddings
    assert validate(cfg, world_size=2).parallel.dp == 2  # dp: auto fills the world


def test_unknown_key_names_it_and_suggests_subprocess():
    result = run_phalanx(["train", CONFIG, "train.stepz=3"])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "train.stepz" in lines[0] and "train.steps" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.fixture
def bad_files(tmp_path: Path) -> dict:
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("x")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train: [steps: 3\n")
    return {"not_a_dir": not_a_dir, "bad_yaml": bad_yaml, "tmp": tmp_path}


# (description, arguments after `train`, words the message must contain)
BAD_INPUTS = [
    ("negative lr", [CONFIG, "optim.lr=-0.1"], ["optim.lr=-0.1", "> 0"]),
    ("missing data file", [CONFIG, "data.kind=memmap", "data.path=/nonexistent/tokens.bin"],
     ["/nonexistent/tokens.bin", "phalanx data prepare"]),
    ("indivisible batch", [CONFIG, "train.batch_size=10", "train.micro_batch_size=4"],
     ["train.batch_size(10)", "micro_batch_size(4)", "train.micro_batch_size=2 to keep the batch", "e.g. 8 or 12"]),
    ("unknown model kind", [CONFIG, "model.kind=llama9"], ["model.kind='llama9'", "gpt"]),
    ("bad dtype", [CONFIG, "train.dtype=fp13"], ["train.dtype='fp13'", "fp32", "bf16"]),
    ("non-existent config file", ["configs/nope.yaml"], ["configs/nope.yaml", "does not exist"]),
    ("world size mismatch", [CONFIG, "parallel.dp=2"], ["dp(2)", "WORLD_SIZE(1)"]),
    ("heads vs kv heads", [CONFIG, "model.n_heads=4", "model.n_kv_heads=3"], ["n_heads(4)", "n_kv_heads(3)"]),
    ("wrong type", [CONFIG, "train.steps=many"], ["train.steps", "many"]),
    ("override without =", [CONFIG, "train.steps"], ["train.steps", "section.key=value"]),
    ("unknown section", [CONFIG, "trian.steps=3"], ["trian", "train"]),
    ("seq_len beyond the model", [CONFIG, "data.seq_len=4096"], ["data.seq_len(4096)", "max_seq_len"]),
    ("unknown dp back end", [CONFIG, "parallel.dp_backend=horovod"], ["horovod", "ddp"]),
    ("pipeline degree beyond the world", [CONFIG, "parallel.pp=2"], ["pp(2)", "WORLD_SIZE(1)"]),
]


@pytest.mark.parametrize("name,args,words", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2(name, args, words, capsys, tmp_path):
    code = main(["train", *args, f"run.dir={tmp_path}"] if args[0] == CONFIG else ["train", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("phalanx: error: ")
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"


def test_unwritable_run_dir(bad_files, capsys):
    code = main(["train", CONFIG, f"run.dir={bad_files['not_a_dir']}/runs", "log.wandb=disabled"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "not writable" in err and "run.dir" in err


def test_invalid_yaml_file(bad_files, capsys):
    assert main(["train", str(bad_files["bad_yaml"])]) == 2
    err = capsys.readouterr().err.strip()
    assert "not valid YAML" in err and len(err.splitlines()) == 1


def test_debug_shows_traceback():
    with pytest.raises(ConfigError):
        main(["--debug", "train", CONFIG, "optim.lr=-1"])


def test_print_config_prints_resolved_yaml(capsys):
    assert main(["train", CONFIG, "train.steps=11", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "steps: 11" in out and "dp: 1" in out  # auto resolved for one process


def test_every_shipped_config_is_valid():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(str(path))


def test_unknown_strategy_name_is_refused_with_the_registered_ones():
    cfg = load_config(CONFIG, ["parallel.pp=2", "parallel.pp_schedule=zero_bubble"])
    with pytest.raises(ConfigError, match=r"parallel.pp_schedule='zero_bubble'.*available: 1f1b, gpipe, interleaved"):
        validate(cfg, world_size=2)
