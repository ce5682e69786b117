"""The command line: ``regnde plugins`` and ``regnde demo`` in a tiny configuration."""

import json

import pytest

from regnde import cli


def test_plugins_lists_backends_methods_and_origins(capsys):
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "torchdiffeq" in out and "tsit5" in out and "(plugin regnde.solvers)" in out
    assert "local-error" in out and "biased" in out


def test_demo_runs_end_to_end_and_writes_json_and_plot(tmp_path, capsys):
    js, png = tmp_path / "demo.json", tmp_path / "nfe.png"
    argv = ["demo", "--iters", "3", "--tol", "1e-5", "--json", str(js), "--plot", str(png),
            "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| vanilla |" in out and "local-error (biased)" in out and "NFE ratio" in out
    data = json.loads(js.read_text())
    names = [r["label"] for r in data["results"]]
    assert names[0] == "vanilla" and "global-error" in names and len(names) == 5
    # a preset of the runner: the same experiment and numbers as `regnde run digits-node`
    assert {r["experiment"] for r in data["results"]} == {"digits-node"}
    assert [r["regularizer"] for r in data["results"]][:2] == ["none", "global-error"]
    assert all(len(r["nfe_history"]) == 3 and r["eval_nfe"] >= 8 for r in data["results"])
    assert png.stat().st_size > 1000


def test_demo_equals_the_runs_it_presets(tmp_path, capsys):
    from regnde.experiments.runner import RunSpec, run

    argv = ["demo", "--iters", "2", "--tol", "1e-5", "--no-progress", "--out",
            str(tmp_path / "demo"), "--json", str(tmp_path / "d.json")]
    assert cli.main(argv) == 0
    demo = json.loads((tmp_path / "d.json").read_text())["results"][2]
    direct = run(RunSpec("digits-node", regularizer="local-error-unbiased", lam="0.3", iters=2,
                         out=tmp_path / "direct", progress=False,
                         overrides={"rtol": "1e-05", "atol": "1e-05"}))
    assert demo["eval_nfe"] == direct["eval_nfe"]
    assert demo["test"]["metric"] == direct["test"]["metric"]


def test_demo_rejects_bad_iterations(capsys):
    assert cli.main(["demo", "--iters", "0"]) == 2
    assert "--iters" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["nonsense"])
