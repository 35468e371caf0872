"""Sweep configs: a TOML file expands to the right grid, and every kind of bad config is one clear error that
changes nothing on disk."""

import hashlib
import textwrap
from pathlib import Path

import pytest

from w2s_theory.cli import main
from w2s_theory.config import load_study, parse_study
from w2s_theory.pipeline import RunSpec
from w2s_theory.store import ResultsStore
from w2s_theory.synthetic import WorldConfig
from w2s_theory.validation import InputError

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"

VALID = """
[study]
name = "grid"
description = "a test grid"
seeds = [0, 1, 2]

[world]
k = 2
strong_dim = [16, 32]
temperature = 3

[run]
loss = ["reverse_kl", "forward_kl"]
head = "mixture"
noise = [0.0, 0.1, 0.2]
n_weak = 50
n_train = 60
n_test = 70
"""


def write(tmp_path, text, name="study.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_a_valid_config_expands_to_the_cartesian_product_of_its_lists_and_seeds(tmp_path):
    study = load_study(write(tmp_path, VALID))
    assert (study.name, study.description) == ("grid", "a test grid")
    assert study.source.endswith("study.toml")
    assert len(study.specs) == 2 * 2 * 3 * 3  # strong_dim x loss x noise x seeds
    assert len({s.run_id for s in study.specs}) == len(study.specs)
    grid = {(s.world.strong_dim, s.loss, s.noise, s.seed) for s in study.specs}
    assert grid == {(m, loss, noise, seed) for m in (16, 32) for loss in ("reverse_kl", "forward_kl")
                    for noise in (0.0, 0.1, 0.2) for seed in (0, 1, 2)}
    first = study.specs[0]
    assert first.world == WorldConfig(k=2, strong_dim=16, temperature=3.0)
    assert (first.head, first.n_weak, first.n_train, first.n_test) == ("mixture", 50, 60, 70)
    assert study.axes == {"world.strong_dim": [16, 32], "run.loss": ["reverse_kl", "forward_kl"],
                          "run.noise": [0.0, 0.1, 0.2], "seed": [0, 1, 2]}


def test_seeds_table_gives_a_range_and_omitted_tables_take_the_defaults():
    study = parse_study({"study": {"name": "s", "seeds": {"start": 5, "count": 3}}})
    assert [s.seed for s in study.specs] == [5, 6, 7]
    assert all(s == RunSpec(seed=s.seed) for s in study.specs)


def test_an_integer_and_a_float_spelling_of_a_number_give_the_same_run():
    a = parse_study({"study": {"name": "s", "seeds": [0]}, "run": {"noise": 0}, "world": {"temperature": 2}})
    b = parse_study({"study": {"name": "s", "seeds": [0]}, "run": {"noise": 0.0}, "world": {"temperature": 2.0}})
    assert a.specs[0].run_id == b.specs[0].run_id


def test_realizable_follows_misspecification_unless_it_is_set():
    study = parse_study({"study": {"name": "s", "seeds": [0]}, "world": {"misspecification": [0.0, 0.3]}})
    assert [(s.world.misspecification, s.world.realizable) for s in study.specs] == [(0.0, True), (0.3, False)]


def test_the_smoke_config_is_a_small_grid():
    study = load_study(EXPERIMENTS / "smoke.toml")
    assert study.name == "smoke"
    assert len(study.specs) == 32


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.name)
def test_every_config_under_experiments_loads(path):
    study = load_study(path)
    assert study.specs and study.name


BAD = [
    # (what is wrong, the TOML, words the one-line message must contain)
    ("unknown table", "[study]\nname='s'\nseeds=[0]\n[model]\nk=2\n", ["[model]", "unknown table", "[world]"]),
    ("unknown run key", "[study]\nname='s'\nseeds=[0]\n[run]\nlos='reverse_kl'\n",
     ["[run] los", "unknown key", "loss, head, noise"]),
    ("unknown world key", "[study]\nname='s'\nseeds=[0]\n[world]\nclasses=3\n",
     ["[world] classes", "unknown key", "strong_dim"]),
    ("unknown study key", "[study]\nname='s'\nseeds=[0]\nseed=1\n", ["[study] seed", "unknown key"]),
    ("seed in run", "[study]\nname='s'\nseeds=[0]\n[run]\nseed=1\n", ["[run] seed", "[study] as seeds"]),
    ("negative noise", "[study]\nname='s'\nseeds=[0]\n[run]\nnoise=[0.1, -0.2]\n", ["[run] noise", "-0.2", "[0, 1]"]),
    ("noise above one", "[study]\nname='s'\nseeds=[0]\n[run]\nnoise=1.5\n", ["[run] noise", "1.5"]),
    ("string for an integer", "[study]\nname='s'\nseeds=[0]\n[world]\nstrong_dim='16'\n",
     ["[world] strong_dim", "integer", "'16'"]),
    ("float for an integer", "[study]\nname='s'\nseeds=[0]\n[run]\nn_train=200.5\n", ["[run] n_train", "integer"]),
    ("boolean for an integer", "[study]\nname='s'\nseeds=[0]\n[world]\nk=true\n", ["[world] k", "integer"]),
    ("zero sample size", "[study]\nname='s'\nseeds=[0]\n[run]\nn_test=0\n", ["[run] n_test", ">= 1"]),
    ("world value out of range", "[study]\nname='s'\nseeds=[0]\n[world]\nk=1\n", ["[world]", "k:"]),
    ("inconsistent world", "[study]\nname='s'\nseeds=[0]\n[world]\nstrong_depth=2\nweak_depth=[1, 3]\n",
     ["[world]", "weak_depth", "weak_depth = 3"]),
    ("explicit contradiction", "[study]\nname='s'\nseeds=[0]\n[world]\nrealizable=true\nmisspecification=0.2\n",
     ["[world]", "misspecification", "realizable"]),
    ("unknown loss", "[study]\nname='s'\nseeds=[0]\n[run]\nloss='kl'\n", ["[run] loss", "'kl'", "reverse_kl"]),
    ("unknown head", "[study]\nname='s'\nseeds=[0]\n[run]\nhead='tree'\n", ["[run] head", "'tree'", "mixture"]),
    ("loss the head cannot fit", "[study]\nname='s'\nseeds=[0]\n[run]\nhead=['mixture', 'softmax']\nloss='squared'\n",
     ["[run] loss", "'squared'", "softmax"]),
    ("empty list", "[study]\nname='s'\nseeds=[0]\n[world]\nstrong_dim=[]\n", ["[world] strong_dim", "empty"]),
    ("no seeds", "[study]\nname='s'\nseeds=[]\n", ["[study] seeds", "empty"]),
    ("zero seed count", "[study]\nname='s'\nseeds={start=0, count=0}\n", ["[study] seeds", "count"]),
    ("negative seed", "[study]\nname='s'\nseeds=[-1]\n", ["[study] seeds", "-1"]),
    ("missing seeds", "[study]\nname='s'\n", ["[study] seeds", "required"]),
    ("missing name", "[study]\nseeds=[0]\n", ["[study] name", "required"]),
    ("missing study", "[run]\nnoise=0.1\n", ["[study]", "missing"]),
    ("duplicate value", "[study]\nname='s'\nseeds=[0]\n[run]\nnoise=[0.1, 0.1]\n", ["[run] noise", "twice"]),
    ("world is not a table", "world = 3\n[study]\nname='s'\nseeds=[0]\n", ["world", "table"]),
    ("TOML syntax", "[study\nname='s'\n", ["not valid TOML", "line 1"]),
]


@pytest.mark.parametrize("what,text,words", BAD, ids=[b[0] for b in BAD])
def test_a_bad_config_is_one_line_naming_the_file_and_the_key(tmp_path, what, text, words):
    path = write(tmp_path, text)
    with pytest.raises(InputError) as info:
        load_study(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    for word in words:
        assert word in message, f"{what}: {word!r} not in {message!r}"


def test_a_missing_config_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="nope.toml: config file not found"):
        load_study(tmp_path / "nope.toml")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", ["unknown key", "negative noise", "missing file", "unavailable device"])
def test_the_sweep_command_exits_2_on_a_bad_config_and_leaves_the_store_untouched(tmp_path, capsys, case):
    store_path = tmp_path / "results.db"
    with ResultsStore(store_path) as store:
        store.write("earlier", [{"run_id": "r1", "gain_test": 0.5}], [{"seed": 0}])
    before = digest(store_path)
    config = {
        "unknown key": write(tmp_path, "[study]\nname='s'\nseeds=[0]\n[run]\nnoice=0.1\n"),
        "negative noise": write(tmp_path, "[study]\nname='s'\nseeds=[0]\n[run]\nnoise=-0.1\n"),
        "missing file": tmp_path / "missing.toml",
        "unavailable device": EXPERIMENTS / "smoke.toml",
    }[case]
    args = ["sweep", str(config), "--store", str(store_path)]
    if case == "unavailable device":
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here, so --device cuda is not an error")
        args += ["--device", "cuda"]
    files_before = sorted(p.name for p in tmp_path.iterdir())
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("w2s-theory sweep: error:") and "\n" not in err
    assert digest(store_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == files_before  # no journal or WAL files either
