"""``tta table``: cells, resume from saved cells, aggregation over seeds/orders, outputs, CLI parsing."""
import csv
import io

import pytest

from tta.eval import table


@pytest.fixture()
def cfg_file(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_text("name: suite\nsetting: continual\nprogress: false\n"
                    "data: {source: generate, n_examples: 10, corruptions: [fog, snow]}\n"
                    "method: {name: source}\n")
    return str(path)


class FakeRunner:
    """Stands in for run_config: errors = 10 * seed + per-domain offset + per-method offset (+ order)."""

    def __init__(self, rounds=1):
        self.calls, self.rounds = [], rounds

    def __call__(self, cfg, out_dir=None):
        self.calls.append(cfg)
        base = 10 * cfg["seed"] + {"source": 0, "tent": 100}[cfg["method"]["name"]] + (cfg["stream"].get("order") or 0)
        doms = [{"round": r, "domain": d, "error": base + off + r} for r in range(self.rounds)
                for d, off in (("fog-5", 1), ("snow-5", 3))]
        rounds = [{"round": r, "mean_error": base + 2 + r} for r in range(self.rounds)]
        return {"domains": doms, "rounds": rounds, "mean_error": sum(x["error"] for x in doms) / len(doms),
                "img_per_s": 100.0, "peak_memory_mb": 10.0 * cfg["seed"], "batch_errors": [base, base + 1, base + 2]}


@pytest.fixture()
def fake(monkeypatch):
    runner = FakeRunner()
    monkeypatch.setattr(table.runner, "run_config", runner)
    return runner


def test_table_aggregates_and_resumes_from_saved_cells(cfg_file, tmp_path, fake):
    out = tmp_path / "out"
    res = table.run_table([cfg_file], methods=["source", "tent"], seeds=[1, 2], out=out, log=lambda *_: None)
    assert len(fake.calls) == 4
    assert {(c["method"]["name"], c["seed"]) for c in fake.calls} == {("source", 1), ("source", 2), ("tent", 1), ("tent", 2)}
    lines = res["markdown"].splitlines()
    assert lines[0] == "| method | fog-5 | snow-5 | mean | img/s | peak MB |"
    assert lines[2] == "| source | 16.00 ± 7.07 | 18.00 ± 7.07 | **17.00 ± 7.07** | 100 | 20 |"  # peak: max over cells
    assert lines[3] == "| tent | 116.00 ± 7.07 | 118.00 ± 7.07 | **117.00 ± 7.07** | 100 | 20 |"
    for name in ("table.md", "table.csv", "errors.png"):
        assert (out / name).stat().st_size > 0
    cells = sorted(p.name for p in (out / "cells").iterdir())
    assert cells == ["source__seed1.json", "source__seed2.json", "tent__seed1.json", "tent__seed2.json"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}

    again = table.run_table([cfg_file], methods=["source", "tent"], seeds=[1, 2], out=out, log=lambda *_: None)
    assert len(fake.calls) == 4 and again["markdown"] == res["markdown"]  # nothing recomputed
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}

    table.run_table([cfg_file], methods=["source", "tent"], seeds=[1, 2, 3], out=out, log=lambda *_: None)
    assert len(fake.calls) == 6  # only the new seed

    (out / "cells" / "tent__seed1.json").unlink()
    table.run_table([cfg_file], methods=["source", "tent"], seeds=[1, 2], out=out, log=lambda *_: None)
    assert len(fake.calls) == 7  # only the missing cell


def test_a_changed_config_recomputes(cfg_file, tmp_path, fake):
    out = tmp_path / "out"
    table.run_table([cfg_file], seeds=[1], out=out, log=lambda *_: None)
    table.run_table([cfg_file], seeds=[1], out=out, overrides=["stream.batch_size=5"], log=lambda *_: None)
    assert len(fake.calls) == 2 and fake.calls[1]["stream"]["batch_size"] == 5
    assert all(c["output"]["save"] for c in fake.calls)  # the runner checkpoints inside the cell folder


def test_orders_are_cells_and_pooled_with_seeds(cfg_file, tmp_path, fake):
    res = table.run_table([cfg_file], seeds=[1], orders=3, out=tmp_path / "o", log=lambda *_: None)
    assert [c["stream"]["order"] for c in fake.calls] == [0, 1, 2]
    assert "| source | 12.00 ± 1.00 | 14.00 ± 1.00 | **13.00 ± 1.00** | 100 |" in res["markdown"]


def test_rows_from_configs_and_name_clashes(cfg_file, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(open(cfg_file).read())
    cells = table.plan([cfg_file, str(other)], None, [1], None)
    assert [c.row for c in cells] == ["source (suite)", "source (other)"]
    cells = table.plan([cfg_file], ["source", "tent"], [1, 2], 2)
    assert len(cells) == 8 and cells[0].key == "source__seed1__order0"
    assert cells[0].overrides(["a.b=1"]) == ["method.name=source", "a.b=1", "seed=1", "stream.order=0", "output.save=true"]


def test_lifelong_columns_are_rounds_and_csv(cfg_file, tmp_path, monkeypatch):
    monkeypatch.setattr(table.runner, "run_config", FakeRunner(rounds=3))
    out = tmp_path / "l"
    res = table.run_table([cfg_file], seeds=[1], out=out, log=lambda *_: None)
    assert res["markdown"].splitlines()[0] == "| method | round 1 | round 2 | round 3 | mean | img/s | peak MB |"
    rows = list(csv.reader(io.StringIO((out / "table.csv").read_text())))
    assert rows[0][:4] == ["method", "cells", "round 1", "round 1 std"]
    assert rows[1][:3] == ["source", "1", "12.0000"]


def test_cli_parsing_mixes_options_and_overrides():
    args = table.parse(["a.yaml", "b.yaml", "--methods", "tent", "cotta", "x.y=1", "--seeds", "1", "2",
                        "--orders", "10", "--out", "d", "data.n_examples=200"])
    assert args["configs"] == ["a.yaml", "b.yaml"] and args["methods"] == ["tent", "cotta"]
    assert args["seeds"] == [1, 2] and args["orders"] == 10 and str(args["out"]) == "d"
    assert sorted(args["overrides"]) == ["data.n_examples=200", "x.y=1"]
    with pytest.raises(SystemExit):
        table.parse(["a.yaml", "--seeds", "one"])


@pytest.mark.realdata
def test_table_end_to_end_on_generated_data(data_dir, tmp_path, capsys):
    from tta.cli import main
    argv = ["table", "configs/cifar10c/base.yaml", "--methods", "source", "tent", "--seeds", "1", "--out",
            str(tmp_path / "t"), f"data.data_dir={data_dir}", "data.source=generate", "data.n_examples=100",
            "data.corruptions=[gaussian_noise,fog]", "stream.batch_size=50", "progress=false", "device=cpu", "threads=1"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "| tent |" in first and "gaussian_noise-5" in first
    mtime = (tmp_path / "t" / "cells" / "tent__seed1.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert capsys.readouterr().out.split("| method")[1] == first.split("| method")[1]
    assert (tmp_path / "t" / "cells" / "tent__seed1.json").stat().st_mtime_ns == mtime
