"""A run is never clobbered: a new run refuses a directory that holds one, and one process at a time trains it."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from capkit.cli import train as train_cli
from capkit.engine import RunDir, load_checkpoint
from capkit.errors import RunDirError
from toys import TINY_SHAPES_CONFIG

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` and a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture
def tiny_config(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CAPKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # runs/ lands here
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_SHAPES_CONFIG)
    return config


def test_a_second_run_on_a_finished_runs_directory_leaves_every_file_as_it_was(tiny_config, tmp_path, capsys):
    assert train_cli.main([str(tiny_config), "train.run_name=first"]) == 0
    run = tmp_path / "runs" / "first"
    before = snapshot(run)
    assert {"config.yaml", "vocab.json", "metrics.jsonl", "train_summary.json", "checkpoints/last/state.json"} <= set(before)
    capsys.readouterr()
    assert train_cli.main([str(tiny_config), "train.run_name=first", "train.lr=1e-2"]) == 2
    err = capsys.readouterr().err
    assert err == (f"capkit train: error: {Path('runs/first')} already holds a run; continue it with --resume "
                   f"runs/first, replace it with --overwrite, or name another run (train.run_name=...)\n")
    assert snapshot(run) == before


def test_overwrite_replaces_the_run_once_its_settings_are_checked(tiny_config, tmp_path):
    assert train_cli.main([str(tiny_config), "train.run_name=again"]) == 0
    run = tmp_path / "runs" / "again"
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints" / "old_extra").mkdir()
    before = snapshot(run)
    # a setting that fails before training: the old run stays as it was
    assert train_cli.main([str(tiny_config), "train.run_name=again", "--overwrite", "train.early_stop_metric=cider"]) == 2
    assert snapshot(run) == before
    assert train_cli.main([str(tiny_config), "train.run_name=again", "--overwrite", "train.lr=1e-2"]) == 0
    assert (run / "notes.txt").read_text() == "mine"  # not a file of the run: it stays
    # a folder the user put beside the checkpoints stays too; the run's own checkpoints are new
    assert (run / "checkpoints" / "old_extra").is_dir() and (run / "checkpoints" / "best" / "state.json").is_file()
    assert "lr: 0.01" in (run / "config.yaml").read_text()


def test_a_run_refused_by_its_checks_leaves_no_directory_behind(tiny_config, tmp_path):
    assert train_cli.main([str(tiny_config), "train.run_name=refused", "train.early_stop_metric=cider"]) == 2
    assert not (tmp_path / "runs").exists()


def test_one_process_at_a_time_holds_a_run_and_a_dead_holder_is_taken_over(tmp_path):
    run = RunDir(tmp_path / "run")
    holder = textwrap.dedent(f"""
        import sys, time
        from capkit.engine import RunDir
        with RunDir({str(run.root)!r}).claim():
            print("held", flush=True)
            sys.stdin.readline()
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=rf"{run.root} is in use by process {proc.pid} on .*; wait for it"):
            with run.claim():
                pass
    finally:
        proc.kill()  # dies holding the run: the OS releases its lock, its owner file stays
        proc.wait()
    with pytest.warns(UserWarning, match=rf"taking over the run from process {proc.pid} on .*ended without releasing"):
        with run.claim():
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with run.claim():  # released cleanly last time: no warning, no owner file left
            pass
    assert not (run.root / ".lock.owner").exists()


KILLER_METRIC = """
import os, signal
from pathlib import Path
from capkit.registry import METRICS

@METRICS.register("kill_at_second_evaluation")
def kill_at_second_evaluation(hyps, refs):
    calls = Path(os.environ["CAPKIT_TEST_CALLS"])
    calls.write_text(calls.read_text() + "x" if calls.exists() else "x")
    if len(calls.read_text()) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # inside the second epoch's evaluation, before its checkpoint
    return 0.0
"""


def test_kill_9_then_resume_with_another_evaluation_setting_trains_exactly_as_uninterrupted(tiny_config, tmp_path, caplog):
    budget = ["train.epochs=3", "train.batch_size=4", "train.lr=1e-2"]
    assert train_cli.main([str(tiny_config), "train.run_name=whole", *budget]) == 0
    (tmp_path / "killer_metric.py").write_text(KILLER_METRIC)
    # the same threads as this process: float sums in another order would differ
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CAPKIT_TEST_CALLS": str(tmp_path / "calls")}
    killed = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train.py"), str(tiny_config), "train.run_name=cut", *budget,
         "plugins=[killer_metric]", "eval.metrics=[sacrebleu,kill_at_second_evaluation]"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    cut, whole = RunDir(tmp_path / "runs" / "cut"), RunDir(tmp_path / "runs" / "whole")
    assert load_checkpoint(cut.last)["epoch"] == 1  # the first epoch's checkpoint survived
    with pytest.warns(UserWarning, match="taking over the run from process"), caplog.at_level(logging.INFO):
        assert train_cli.main([str(tiny_config), "--resume", str(cut.root), "train.run_name=cut", *budget]) == 0
    assert "resume: eval.metrics is ['sacrebleu'] (the run had ['sacrebleu', 'kill_at_second_evaluation'])" in caplog.text
    resumed, reference = load_checkpoint(cut.last), load_checkpoint(whole.last)
    assert resumed["global_step"] == reference["global_step"] > 0
    for key, value in reference["model"].items():
        assert torch.equal(resumed["model"][key], value), key

    def losses(run):
        return [json.loads(line)["loss"] for line in run.metrics.read_text().splitlines() if '"loss"' in line]

    assert losses(cut) == losses(whole)


def test_overwrite_removes_only_what_the_run_wrote_never_a_users_look_alike_files(tiny_config, tmp_path):
    from capkit.cli import evaluate as evaluate_cli

    assert train_cli.main([str(tiny_config), "train.run_name=mine"]) == 0
    run = RunDir(tmp_path / "runs" / "mine")
    assert evaluate_cli.main(["--checkpoint", str(run.best), "--split", "val", "--metrics", "sacrebleu",
                              "--tokenizer", "none", "--gallery", "2", "--device", "cpu"]) == 0
    assert (run.root / "test_metrics.json").is_file() and (run.root / "gallery_val").is_dir()
    # files a user keeps there whose names look like a run's
    for name in ("holiday_metrics.json", "my_captions.json", "best_per_image.json", "notes.txt"):
        (run.root / name).write_text(f"the user's {name}")
    (run.root / "gallery_mine").mkdir()
    (run.root / "gallery_mine" / "photo.txt").write_text("kept")
    users = {k: v for k, v in snapshot(run.root).items()
             if k.startswith(("holiday", "my_", "best_", "notes", "gallery_mine"))}
    assert len(users) == 5
    assert train_cli.main([str(tiny_config), "train.run_name=mine", "--overwrite", "train.lr=1e-2"]) == 0
    after = snapshot(run.root)
    assert {k: after.get(k) for k in users} == users  # byte-identical
    assert not (run.root / "gallery_val").exists()  # the run's own gallery went with it
    assert (run.root / "test_metrics.json").is_file() and "lr: 0.01" in run.config.read_text()
    assert json.loads(run.written.read_text()) == ["test_captions.json", "test_metrics.json", "test_per_image.json"]


def test_the_list_of_written_files_cannot_name_anything_outside_the_run(tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    (tmp_path / "outside.txt").write_text("keep")
    run.written.write_text(json.dumps(["../outside.txt", "/etc/hostname", "", "..", "sub/x"]))
    (run.root / "metrics.jsonl").write_text("{}\n")
    run.clear()
    assert (tmp_path / "outside.txt").read_text() == "keep" and not (run.root / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match="is not directly in the run directory"):
        run.record(tmp_path / "outside.txt")


def test_a_run_that_fails_while_its_data_is_prepared_leaves_nothing_and_the_retry_runs(tiny_config, tmp_path,
                                                                                      monkeypatch):
    from capkit.errors import CorruptImageError
    from capkit.recipes import train as train_recipe

    def failing(*args, **kwargs):
        raise CorruptImageError("shapes_train_00003.png: cannot decode (as a damaged image in the cache extraction)")

    with monkeypatch.context() as patch:
        patch.setattr(train_recipe, "build_train_loader_for", failing)
        assert train_cli.main([str(tiny_config), "train.run_name=retry"]) == 2
    assert not (tmp_path / "runs" / "retry").exists()
    assert train_cli.main([str(tiny_config), "train.run_name=retry"]) == 0  # not refused as "already holds a run"


@pytest.mark.parametrize("damage", ["vocabulary", "weights"])
def test_resume_from_a_checkpoint_that_does_not_fit_is_refused_before_anything_is_written(tiny_config, tmp_path,
                                                                                        capsys, monkeypatch, damage):
    from safetensors.torch import load_file, save_file

    from capkit.recipes import train as train_recipe

    assert train_cli.main([str(tiny_config), "train.run_name=fit"]) == 0
    run = RunDir(tmp_path / "runs" / "fit")
    if damage == "vocabulary":  # two words swapped: every id after them would mean another word
        doc = json.loads(run.vocab.read_text())
        doc["itos"][5], doc["itos"][6] = doc["itos"][6], doc["itos"][5]
        run.vocab.write_text(json.dumps(doc))
    else:
        weights = load_file(run.last / "model.safetensors")
        key = next(k for k in weights if k.startswith("decoder.") and weights[k].dim() == 2)
        weights[key] = torch.zeros(weights[key].shape[0] + 1, weights[key].shape[1])
        save_file(weights, run.last / "model.safetensors")
    before = snapshot(run.root)
    built = []
    monkeypatch.setattr(train_recipe, "build_train_loader_for", lambda *a, **k: built.append(1))
    capsys.readouterr()
    assert train_cli.main([str(tiny_config), "--resume", str(run.root), "train.run_name=fit", "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"capkit train: error: --resume {run.root}: ") and err.count("\n") == 1, err
    assert {"vocabulary": "its vocabulary differs from the run's vocab.json",
            "weights": "its weights do not fit the model of the run's config"}[damage] in err
    assert built == [] and snapshot(run.root) == before


def test_overwrite_keeps_what_a_user_put_in_checkpoints_and_tensorboard_and_never_takes_a_folder_that_is_no_run(
        tiny_config, tmp_path):
    assert train_cli.main([str(tiny_config), "train.run_name=kept"]) == 0
    run = RunDir(tmp_path / "runs" / "kept")
    shutil.copytree(run.best, run.checkpoints / "best_keep_epoch1")  # a user's copy of a checkpoint
    (run.tensorboard / "my_notes.txt").write_text("mine")
    kept = {k: v for k, v in snapshot(run.root).items() if "best_keep_epoch1" in k or "my_notes" in k}
    old_events = sorted(run.tensorboard.rglob("events.out.tfevents.*"))
    assert old_events
    assert train_cli.main([str(tiny_config), "train.run_name=kept", "--overwrite", "train.lr=1e-2"]) == 0
    assert {k: v for k, v in snapshot(run.root).items() if k in kept} == kept
    assert not any(p.exists() for p in old_events)  # the replaced run's own events are gone

    # a folder with a config.yaml and user files in checkpoints/ is no run: never replaced, even with --overwrite
    project = tmp_path / "runs" / "project"
    (project / "checkpoints" / "mine").mkdir(parents=True)
    (project / "config.yaml").write_text("my: settings\n")
    (project / "checkpoints" / "mine" / "weights.txt").write_text("mine")
    before = snapshot(project)
    for extra in ([], ["--overwrite"]):
        assert train_cli.main([str(tiny_config), "train.run_name=project", *extra]) == 2
        assert snapshot(project) == before
