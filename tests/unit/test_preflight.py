"""`lightning-ray check` checks what a run needs: the dataset splits (rows, fields), the agent import, the chat
template and the tool parser on a sample, finite numbers; every problem names the field and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_ray import cli
from lightning_ray.config import ConfigError, load_config
from lightning_ray.preflight import PreflightError, preflight

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "examples/calc/data/train.jsonl"


def config(tmp_path: Path, yaml_text: str, *overrides: str):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    return load_config(path, list(overrides))


def test_a_good_config_reports_what_it_found(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    val = tmp_path / "val.jsonl"
    val.write_text(
        '{"id": "a", "question": "1+1", "answer": "2"}\n{"id": "b", "question": "2+2", "answer": "4"}\n'
    )
    lines = preflight(config(tmp_path, f"data: {{train: {TRAIN}, val: {val}}}\n"))
    text = "\n".join(lines)
    assert f"data.train: {TRAIN}: 2000 rows, fields answer, id, level, question" in text
    assert f"data.val: {val}: 2 rows, fields answer, id, question" in text
    assert "rollout.agent: examples.calc.agent:calc_agent imports" in text
    assert "model.path (chat template): builtin:smollm2-135m-instruct's tokenizer renders a sample" in text
    assert "model.tool_parser: 'hermes' parses a sample answer" in text


def test_every_problem_is_named_by_field_and_file(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    bad_rows = tmp_path / "train.jsonl"
    bad_rows.write_text('{"id": "a", "question": "1+1"}\nnot json\n')
    template = tmp_path / "broken.jinja"
    template.write_text("{% for m in messages %}{{ m.content }")
    cfg = config(
        tmp_path,
        f"data: {{train: {bad_rows}, val: null}}\nmodel: {{chat_template: {template}, tool_parser: nope}}\n"
        "rollout: {agent: 'no_such_module_13:agent'}\n",
    )
    with pytest.raises(PreflightError) as info:
        preflight(cfg)
    text = str(info.value)
    assert f"config {tmp_path / 'run.yaml'} cannot run:" in text
    assert f"data.train: {bad_rows}:2" in text  # the file and the line of the bad row
    assert "rollout.agent: agent 'no_such_module_13:agent': cannot import module 'no_such_module_13'" in text
    assert f"model.chat_template: {template}: rendering a sample conversation failed" in text
    assert "model.tool_parser: unknown tool parser 'nope'" in text


def test_non_finite_numbers_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.success_threshold: Input should be a finite number"):
        config(tmp_path, f"data: {{train: {TRAIN}, val: null}}\ntrainer: {{success_threshold: .nan}}\n")
    with pytest.raises(ConfigError, match=r"run.yaml:\n  inference.sampling.temperature: .*finite"):
        config(tmp_path, f"data: {{train: {TRAIN}, val: null}}\n", "inference.sampling.temperature=.inf")


def test_cli_check_prints_the_findings_and_fails_on_a_problem(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    path = tmp_path / "run.yaml"
    path.write_text(f"data: {{train: {TRAIN}, val: null}}\n")
    assert cli.main(["check", str(path), "ray.num_cpus=4"]) == 0
    assert "2000 rows" in capsys.readouterr().out
    assert cli.main(["check", str(path), "rollout.agent=examples.calc.agent:no_agent"]) == 2
    assert "rollout.agent: agent 'examples.calc.agent:no_agent': module" in capsys.readouterr().err
