"""Secrets (the gateway's bearer token) reach the parts that use them and nothing that is kept: the run
directory's config.yaml, wandb's config and files, the captured logs of a rollout, a printed config."""

from __future__ import annotations

import os

import yaml

from lightning_ray.config import Config, load_config, public_dump
from lightning_ray.monitor.run_log import RunLog
from lightning_ray.rollouts.capture import MASK, masked
from lightning_ray.runtime import new_run_dir

TOKEN = "tok-5e3c7a1f9b"


def secret_config(tmp_path, *more: str) -> Config:
    return load_config(
        None,
        ["gateway.host=0.0.0.0", f"gateway.auth_token={TOKEN}", f"trainer.run_dir={tmp_path}", *more],
        check_files=False,
    )


def files_holding(root, text: str) -> list[str]:
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                if text.encode() in f.read():
                    found.append(path)
    return found


def test_the_token_is_usable_but_never_shown(tmp_path):
    cfg = secret_config(tmp_path)
    assert cfg.gateway.token() == TOKEN
    assert TOKEN not in repr(cfg) and TOKEN not in str(cfg.gateway)
    assert public_dump(cfg)["gateway"]["auth_token"] == MASK
    # what a rollout worker receives (an actor argument, never written down) still carries it
    assert Config.model_validate(cfg.model_dump()).gateway.token() == TOKEN


def test_run_dir_config_masks_the_token(tmp_path):
    run_dir = new_run_dir(secret_config(tmp_path), "train")
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["gateway"]["auth_token"] == MASK
    assert files_holding(tmp_path, TOKEN) == []


def test_wandb_config_and_files_mask_the_token(tmp_path, monkeypatch):
    """A real offline wandb run: its config and every file it writes lack the token."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = secret_config(tmp_path, "logging.wandb=true", "logging.report=false")
    run_dir = new_run_dir(cfg, "train")
    log = RunLog(cfg, run_dir)
    try:
        assert log.wandb.config["gateway"]["auth_token"] == MASK
        log.log(1, {"loss": 0.5})
    finally:
        log.close()
    assert files_holding(tmp_path, TOKEN) == []


def test_captured_logs_mask_the_token():
    assert masked(f"calling with api_key={TOKEN}\nok", TOKEN) == f"calling with api_key={MASK}\nok"
    assert masked("nothing secret", None) == "nothing secret"
    assert masked(None, TOKEN) is None
