"""Config validation: every bad input names the file and the field, before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_ray.config import ConfigError, load_config, public_dump, threads
from lightning_ray.resources import check_resources, oversubscription

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_and_sections(tmp_path):
    cfg = load_config(write(tmp_path, "trainer: {steps: 3}\n"), check_files=False)
    assert cfg.trainer.steps == 3
    assert cfg.inference.sampling.temperature == 1.0
    assert cfg.gateway.host == "127.0.0.1"


def test_unknown_key_names_field_and_file(tmp_path):
    path = write(tmp_path, "inference:\n  num_replica: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, check_files=False)
    assert "inference.num_replica: unknown field" in str(e.value)
    assert str(path) in str(e.value)


def test_wrong_type_and_impossible_value(tmp_path):
    path = write(tmp_path, "learner: {zero_stage: 5}\ninference: {max_model_len: many}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, check_files=False)
    msg = str(e.value)
    assert "learner.zero_stage" in msg and "inference.max_model_len" in msg


def test_missing_data_file_is_named(tmp_path):
    path = write(tmp_path, "data: {train: nowhere.jsonl, val: null}\n")
    with pytest.raises(ConfigError, match=r"data.train: file not found: nowhere.jsonl"):
        load_config(path)


def test_relative_paths_resolve_from_the_config_folder(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"question": "1+1", "answer": 2}\n')
    cfg = load_config(write(tmp_path, "data: {train: train.jsonl, val: null}\n"))
    assert cfg.data.train == "train.jsonl"


def test_overrides_are_validated_like_the_file(tmp_path):
    path = write(tmp_path, "trainer: {steps: 3}\n")
    cfg = load_config(path, ["trainer.steps=7", "inference.sampling.temperature=0.5"], check_files=False)
    assert cfg.trainer.steps == 7 and cfg.inference.sampling.temperature == 0.5
    with pytest.raises(ConfigError, match="trainer.steps"):
        load_config(path, ["trainer.steps=-1"], check_files=False)
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(path, ["trainer.steps"], check_files=False)


def test_checkpoint_defaults_keep_a_run_resumable(tmp_path):
    path = write(tmp_path, "trainer: {steps: 3}\n")
    trainer = load_config(path, check_files=False).trainer
    assert trainer.checkpoint_every == 5 and trainer.keep_checkpoints == 1
    every = load_config(path, ["trainer.keep_checkpoints=null"], check_files=False)
    assert every.trainer.keep_checkpoints is None
    with pytest.raises(ConfigError, match="trainer.keep_checkpoints"):
        load_config(path, ["trainer.keep_checkpoints=0"], check_files=False)


def test_non_loopback_gateway_needs_a_token(tmp_path):
    with pytest.raises(ConfigError, match="gateway.auth_token"):
        load_config(write(tmp_path, "gateway: {host: 0.0.0.0}\n"), check_files=False)
    cfg = load_config(write(tmp_path, "gateway: {host: 0.0.0.0, auth_token: s3cret}\n"), check_files=False)
    assert cfg.gateway.token() == "s3cret"


def test_more_gpus_than_the_cluster_fails_before_start(tmp_path):
    cfg = load_config(write(tmp_path, "inference: {num_gpus_per_replica: 2}\n"), check_files=False)
    with pytest.raises(ConfigError, match="inference.num_gpus_per_replica: 2.0 > 1 GPUs"):
        check_resources(cfg, {"CPU": 16, "GPU": 1})
    cfg = load_config(
        write(tmp_path, "rollout: {num_workers: 40, num_cpus_per_worker: 1}\n"), check_files=False
    )
    with pytest.raises(ConfigError, match="ask for 42 CPUs, the cluster has 8"):
        check_resources(cfg, {"CPU": 8})


def test_frozen_agents_default_empty_and_disjoint_from_trained(tmp_path):
    assert load_config(None, check_files=False).rollout.frozen_agents == []
    text = "rollout: {train_agents: [solver], frozen_agents: [checker]}\n"
    cfg = load_config(write(tmp_path, text), check_files=False)
    assert (cfg.rollout.train_agents, cfg.rollout.frozen_agents) == (["solver"], ["checker"])
    both = write(tmp_path, "rollout: {train_agents: [solver, checker], frozen_agents: [checker]}\n")
    with pytest.raises(
        ConfigError, match=r"run.yaml:\n  rollout: .*frozen_agents and train_agents both name"
    ):
        load_config(both, check_files=False)
    with pytest.raises(ConfigError, match=r"rollout: .*frozen_agents=\['checker'\] needs train_agents"):
        load_config(None, ["rollout.frozen_agents=[checker]"], check_files=False)  # unset trains every role


def test_frozen_snapshot_counts_as_a_second_deployment():
    sizes = ["inference.num_cpus_per_replica=2", "rollout.num_workers=1", "rollout.num_cpus_per_worker=1"]
    check_resources(load_config(None, sizes, check_files=False), {"CPU": 4})
    frozen = [*sizes, "rollout.train_agents=[solver]", "rollout.frozen_agents=[checker]"]
    with pytest.raises(ConfigError, match="ask for 6 CPUs, the cluster has 4"):
        check_resources(load_config(None, frozen, check_files=False), {"CPU": 4})


def test_compute_threads_beyond_the_cores_warn_naming_the_fields():
    threads = ["inference.engine_threads=2", "learner.torch_threads=2"]
    assert oversubscription(load_config(None, threads, check_files=False), cores=2) is None  # sync: turns
    overlapped = load_config(
        None, [*threads, "trainer.max_staleness=1", "algorithm.old_logprobs=decoupled"], check_files=False
    )
    warning = oversubscription(overlapped, cores=2)
    assert warning.startswith("4 compute threads at once on 2 cores")
    assert "inference.engine_threads 2" in warning and "learner.torch_threads 2" in warning
    assert oversubscription(overlapped, cores=4) is None
    two_engines = [
        "rollout.train_agents=[solver]",
        "rollout.frozen_agents=[checker]",
        "inference.engine_threads=2",
    ]
    assert "2 CPU engine(s)" in oversubscription(load_config(None, two_engines, check_files=False), cores=2)
    on_gpus = ["inference.num_gpus_per_replica=1", "learner.num_gpus_per_worker=1", *two_engines[:2]]
    assert (
        oversubscription(
            load_config(
                None,
                [*on_gpus, "trainer.max_staleness=1", "algorithm.old_logprobs=decoupled"],
                check_files=False,
            ),
            cores=1,
        )
        is None
    )


def test_tensor_parallel_needs_gpus(tmp_path):
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 needs num_gpus_per_replica"):
        load_config(write(tmp_path, "inference: {tensor_parallel_size: 2}\n"), check_files=False)


def test_kv_block_size_auto_is_finer_on_cpu_than_vllms_default():
    def engine_block(*overrides: str) -> int | None:
        return load_config(None, list(overrides), check_files=False).inference.engine_block_size()

    assert engine_block() == 32  # vLLM's CPU default is 128
    assert engine_block("inference.num_gpus_per_replica=1") is None  # vLLM's own default
    assert engine_block("inference.block_size=128") == 128
    with pytest.raises(ConfigError, match="block_size"):
        load_config(None, ["inference.block_size=0"], check_files=False)


def test_tree_attention_needs_packed_micro_batches(tmp_path):
    cfg = write(tmp_path, "learner: {attention: tree, packing: false}\n")
    with pytest.raises(ConfigError, match="learner.attention=tree .* learner.packing is false"):
        load_config(cfg, check_files=False)
    assert load_config(cfg, ["learner.packing=true"], check_files=False).learner.attention == "tree"


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "trainer: [unclosed\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_cli_check_exit_codes(tmp_path):
    good = write(tmp_path, f"data: {{train: {REPO / 'examples/calc/data/train.jsonl'}}}\n")
    run = subprocess.run(
        [sys.executable, "-m", "lightning_ray.cli", "check", str(good), "data.val=null", "ray.num_cpus=4"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr
    assert "ok" in run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "lightning_ray.cli", "check", str(good), "learner.lr=zero"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert bad.returncode == 2
    assert "learner.lr" in bad.stderr


def test_staleness_needs_the_behaviour_policy_in_the_loss():
    assert load_config(None, check_files=False).trainer.max_staleness == 0  # synchronous by default
    with pytest.raises(
        ConfigError,
        match=r"trainer.max_staleness=1 with algorithm.old_logprobs=recompute: the recomputed log-probs hide "
        r"the behaviour policy",
    ):
        load_config(None, ["trainer.max_staleness=1"], check_files=False)
    with pytest.raises(ConfigError, match="trainer.max_staleness"):
        load_config(None, ["trainer.max_staleness=-1"], check_files=False)
    for old in ("rollout", "decoupled"):
        cfg = load_config(
            None, ["trainer.max_staleness=2", f"algorithm.old_logprobs={old}"], check_files=False
        )
        assert (cfg.trainer.max_staleness, cfg.algorithm.old_logprobs) == (2, old)


def test_staleness_with_several_optimizer_steps_needs_decoupled_ppo():
    stale = ["trainer.max_staleness=1", "learner.gradient_accumulation_steps=1"]
    with pytest.raises(
        ConfigError,
        match=r"trainer.max_staleness=1 with learner.gradient_accumulation_steps=1 \(several optimizer steps "
        r"per batch\) and algorithm.old_logprobs=rollout: .*set algorithm.old_logprobs to decoupled",
    ):
        load_config(None, [*stale, "algorithm.old_logprobs=rollout"], check_files=False)
    cfg = load_config(None, [*stale, "algorithm.old_logprobs=decoupled"], check_files=False)
    assert cfg.learner.gradient_accumulation_steps == 1
    # synchronous: mini-batches with any old log-probs, as before
    for old in ("recompute", "rollout", "decoupled"):
        sync = ["learner.gradient_accumulation_steps=2", f"algorithm.old_logprobs={old}"]
        assert load_config(None, sync, check_files=False).algorithm.old_logprobs == old


def test_auto_threads_share_the_cores_among_what_computes_at_once(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(threads, "local_cores", lambda: 4)
    auto = ["inference.engine_threads=auto", "learner.torch_threads=auto"]
    overlapped = ["trainer.max_staleness=1", "algorithm.old_logprobs=decoupled"]
    two_engines = ["rollout.train_agents=[solver]", "rollout.frozen_agents=[checker]"]

    def settled(*overrides: str) -> tuple[int, int]:
        cfg = load_config(None, [*auto, *overrides], check_files=False)
        assert oversubscription(cfg, cores=4) is None or cfg.ray.address  # checked on a local cluster only
        dumped = public_dump(cfg)  # the run's config.yaml holds the numbers it ran with
        return dumped["inference"]["engine_threads"], dumped["learner"]["torch_threads"]

    assert settled() == (4, 4)  # synchronous: the engine generates, then the learner trains, on every core
    assert settled(*overlapped) == (2, 2)  # at once: half each
    assert settled(*two_engines) == (2, 4)
    assert settled(*two_engines, *overlapped) == (
        1,
        1,
    )  # 4 cores for 3 at once: never more threads than cores
    assert settled("learner.num_gpus_per_worker=1", *overlapped) == (4, 4)  # a GPU learner leaves the cores
    pinned = load_config(None, [*auto[1:], *overlapped, "inference.engine_threads=3"], check_files=False)
    assert (pinned.inference.engine_threads, pinned.learner.torch_threads) == (3, 2)  # a number is kept

    joined = [
        "ray.address=127.0.0.1:6379",
        "inference.num_cpus_per_replica=8",
        "learner.num_cpus_per_worker=0.5",
    ]
    assert settled(*joined) == (8, 1)  # a joined cluster: the CPUs Ray gives each actor
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # as `ray job submit` sets it
    assert load_config(None, [*auto, *joined[1:]], check_files=False).inference.engine_threads == 8


def test_the_quickstart_made_asynchronous_fits_the_cores_it_runs_on(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(threads, "local_cores", lambda: 2)
    quickstart = REPO / "configs" / "quickstart.yaml"
    sync = load_config(quickstart, check_files=False)
    assert (sync.inference.engine_threads, sync.learner.torch_threads) == (2, 2)
    overlapped = ["trainer.max_staleness=1", "algorithm.old_logprobs=decoupled"]
    cfg = load_config(quickstart, overlapped, check_files=False)
    assert (cfg.inference.engine_threads, cfg.learner.torch_threads) == (1, 1)
    assert oversubscription(cfg, cores=2) is None
