"""The ``paper_tables`` figure: the paper's two tables simulated in their shape are written from the results
store (both tables, the four loss columns, the paper's rows), and their paired differences are the
differences of the stored rows."""

import json
import math
import sqlite3

import pytest

from w2s_theory import figures
from w2s_theory.store import ResultsStore

LOSS_HEADS = ("forward KL", "reverse KL", "forward CE", "reverse CE")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_tables")
    store, out = root / "results.db", root / "out"
    done = figures.make_figures(store, out, quick=True, only=["paper_tables"], progress=False, say=lambda s: None)
    return {"store": store, "out": out, "done": done}


def tables_of(text: str) -> dict[str, list[list[str]]]:
    """Each markdown table under its bold title -> rows of cells (header first, separator dropped)."""
    tables, title = {}, None
    for line in text.splitlines():
        if line.startswith("**Table"):
            title = line.strip("*").split(" — ")[0]
            tables[title] = []
        elif line.startswith("|") and title and not line.startswith("|---"):
            tables[title].append([c.strip() for c in line.strip().strip("|").split("|")])
    return tables


def stored(store_path) -> "object":
    with ResultsStore(store_path) as store:
        return store.dataframe("paper_tables_quick")


def dims(frame):
    weak, strong = sorted(frame["world_weak_dim"].unique()), sorted(frame["world_strong_dim"].unique())
    return {"Base→Medium": (weak[0], strong[0]), "Base→Large": (weak[0], strong[1]),
            "Medium→Large": (weak[1], strong[1])}


def paired(frame, row_dims, noise, trainer, a, b):
    """mean and s.e. (points) of metric(a) - metric(b) over seeds, recomputed here from the store's rows."""
    at = frame[(frame["world_weak_dim"] == row_dims[0]) & (frame["world_strong_dim"] == row_dims[1])
               & (frame["noise"] == noise) & (frame["trainer"] == trainer)]
    by_seed = at.pivot_table(index="seed", columns="loss", values="student_test_accuracy")
    d = 100 * (by_seed[a] - by_seed[b]).to_numpy()
    return d.mean(), d.std(ddof=1) / math.sqrt(d.size)


def test_markdown_has_both_tables_with_every_loss_and_the_papers_rows(built):
    assert built["done"]["paper_tables"]["computed"] == 2 * 2 * 2 * 5 * 4 * 2  # seeds x weak x strong x noise x losses x trainers
    for suffix in ("png", "pdf", "md"):
        assert (built["out"] / f"paper_tables.{suffix}").stat().st_size > 1000
    tables = tables_of((built["out"] / "paper_tables.md").read_text())
    assert set(tables) == {"Table 1", "Table 2"}
    for rows in tables.values():
        header = rows[0]
        assert [h for h in header if h in LOSS_HEADS] == list(LOSS_HEADS)
        assert {len(r) for r in rows} == {len(header)}
    assert [r[0].split(" (")[0] for r in tables["Table 1"][1:]] == ["Base→Medium", "Base→Large", "Medium→Large"]
    assert [r[0] for r in tables["Table 2"][1:]] == ["10%", "20%", "30%", "40%"]


def test_cells_are_the_stored_means_and_paired_differences_of_the_stored_rows(built):
    frame = stored(built["store"])
    tables = tables_of((built["out"] / "paper_tables.md").read_text())
    header = tables["Table 1"][0]
    row_dims = dims(frame)
    for row in tables["Table 1"][1:]:
        name = row[0].split(" (")[0]
        at = frame[(frame["world_weak_dim"] == row_dims[name][0]) & (frame["world_strong_dim"] == row_dims[name][1])
                   & (frame["noise"] == 0)]
        for loss, head in zip(figures.LOSS_ORDER, LOSS_HEADS):
            cell = row[header.index(head)]
            practice = 100 * at[(at["trainer"] == "practice") & (at["loss"] == loss)]["student_test_accuracy"]
            exact = 100 * at[(at["trainer"] == "exact") & (at["loss"] == loss)]["student_test_accuracy"]
            assert cell.startswith(f"{practice.mean():.1f} ± {practice.std(ddof=1) / math.sqrt(len(practice)):.1f}")
            assert cell.endswith(f"[{exact.mean():.1f}]")
        for trainer in ("practice", "exact"):
            mean, se = paired(frame, row_dims[name], 0.0, trainer, "reverse_kl", "forward_kl")
            assert row[header.index(f"rev KL − fwd KL, {trainer}")].strip("*") == f"{mean:+.2f} ± {se:.2f}"
    header = tables["Table 2"][0]
    for row in tables["Table 2"][1:]:
        noise = float(row[0].rstrip("%")) / 100
        mean, se = paired(frame, row_dims["Base→Medium"], noise, "practice", "reverse_ce", "forward_kl")
        assert row[header.index("rev CE − fwd KL, practice")].strip("*") == f"{mean:+.2f} ± {se:.2f}"
        # the paper's column is the paper's reported difference, from its table, not from the simulation
        paper = figures.PAPER_TABLE_NOISE[noise]
        assert row[-1] == (f"{paper['reverse_kl'] - paper['forward_kl']:+.1f} / "
                           f"{paper['reverse_ce'] - paper['forward_kl']:+.1f}")


def test_an_edited_stored_row_changes_the_table(built):
    # Overwrite one stored practice accuracy; the regenerated paired difference must follow the store.
    db = sqlite3.connect(built["store"])
    rows = db.execute("SELECT r.run_id, r.metrics FROM runs r JOIN study_runs s ON s.run_id = r.run_id "
                      "WHERE s.study = 'paper_tables_quick'").fetchall()
    frame = stored(built["store"])
    base_medium = dims(frame)["Base→Medium"]
    edited = 0
    for run_id, metrics in rows:
        m = json.loads(metrics)
        if (m["loss"] == "reverse_kl" and m["trainer"] == "practice" and m["noise"] == 0.3 and m["seed"] == 0
                and (m["world_weak_dim"], m["world_strong_dim"]) == base_medium):
            m["student_test_accuracy"] = 0.0123
            db.execute("UPDATE runs SET metrics = ? WHERE run_id = ?", (json.dumps(m), run_id))
            edited += 1
    db.commit()
    db.close()
    assert edited == 1
    done = figures.make_figures(built["store"], built["out"], quick=True, only=["paper_tables"], progress=False,
                                say=lambda s: None)
    assert done["paper_tables"]["computed"] == 0
    frame = stored(built["store"])
    mean, se = paired(frame, base_medium, 0.3, "practice", "reverse_kl", "forward_kl")
    assert mean < -20  # the edit dominates the difference of two seeds
    table = tables_of((built["out"] / "paper_tables.md").read_text())["Table 2"]
    row = next(r for r in table if r[0] == "30%")
    assert row[table[0].index("rev KL − fwd KL, practice")].strip("*") == f"{mean:+.2f} ± {se:.2f}"
    at = frame[(frame["world_weak_dim"] == base_medium[0]) & (frame["world_strong_dim"] == base_medium[1])
               & (frame["noise"] == 0.3) & (frame["trainer"] == "practice") & (frame["loss"] == "reverse_kl")]
    assert row[table[0].index("reverse KL")].startswith(f"{100 * at['student_test_accuracy'].mean():.1f} ± ")
