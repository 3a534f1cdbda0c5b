"""``tta methods``: every registered method with its summary, what it adapts, its cost and source data."""
import tta
from tta.cli import main, method_rows


def test_every_method_is_listed_with_a_description(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    names = tta.methods.available()
    assert all(f"\n{n} " in "\n" + out or out.startswith(n) for n in names)
    rows = method_rows()
    assert [r[0] for r in rows] == names
    assert all(r[1] and r[2] and "/" in r[3] for r in rows)  # a summary, what it adapts, fwd / bwd
    needs = {r[0] for r in rows if r[4] != "-"}
    assert {"eata", "rmt", "santa", "gtta", "petta", "foa"} <= needs


def test_markdown_and_filter(capsys):
    assert main(["methods", "--markdown", "--requires", "clip"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| method | summary |") and len(lines) == 2 + len(method_rows("clip"))
    assert all(tta.methods.info(line.split("`")[1]).requires == "clip" for line in lines[2:])
