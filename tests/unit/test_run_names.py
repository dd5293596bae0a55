"""Two runs on one cluster get names of their own (Serve apps, weight registries, task pools, rollout workers)
and run directories of their own, even with the same `trainer.name` started in the same second."""

from __future__ import annotations

from lightning_ray import names
from lightning_ray.config import load_config
from lightning_ray.inference.server import APP_NAME, FROZEN_APP_NAME
from lightning_ray.runtime import new_run_dir, run_directory
from lightning_ray.weights.registry import registry_name


def config(tmp_path):
    return load_config(None, [f"trainer.run_dir={tmp_path}", "trainer.name=same"], check_files=False)


def run_names(cfg) -> set[str]:
    app, frozen = names.inference_app(cfg), names.frozen_app(cfg)
    return {
        app,
        frozen,
        registry_name(app),
        registry_name(frozen),
        names.task_pool(cfg, "train"),
        names.task_pool(cfg, "val"),
        f"{names.worker_prefix(cfg)}-0",
    }


def test_runs_started_together_share_no_name(tmp_path):
    a, b = config(tmp_path), config(tmp_path)
    dir_a, dir_b = new_run_dir(a, "train"), new_run_dir(b, "train")  # the same second, the same name
    assert dir_a != dir_b and dir_a.parent == dir_b.parent
    assert a.ray.run_id and b.ray.run_id and a.ray.run_id != b.ray.run_id
    assert a.ray.run_id.startswith(f"same.{dir_a.name}.")
    assert len(run_names(a)) == 7 and not run_names(a) & run_names(b)
    # a second root with the same run directory name still gets another id
    other = load_config(None, [f"trainer.run_dir={tmp_path / 'x'}", "trainer.name=same"], check_files=False)
    run_directory(other, "train", resume=str(dir_a))
    assert other.ray.run_id != a.ray.run_id and not run_names(other) & run_names(a)


def test_an_id_in_the_config_is_kept_and_none_means_the_fixed_names(tmp_path):
    cfg = load_config(None, [f"trainer.run_dir={tmp_path}", "ray.run_id=mine"], check_files=False)
    new_run_dir(cfg, "rollout")
    assert cfg.ray.run_id == "mine" and names.inference_app(cfg) == f"{APP_NAME}.mine"
    plain = load_config(None, check_files=False)
    assert (names.inference_app(plain), names.frozen_app(plain)) == (APP_NAME, FROZEN_APP_NAME)
