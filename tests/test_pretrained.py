"""pretrained.py: every --init form loads offline from local files, unsafe pickles are refused
unexecuted, a head of another class count is replaced, and other mismatches are one line."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torchvision

from paper_repro import results
from paper_repro.models import pretrained
from paper_repro.training import runner
from paper_repro.data import dataset_info
from paper_repro.models import build_model
from paper_repro.cli import main
from paper_repro.errors import CheckpointError, ConfigError
from paper_repro.models import create_model
from conftest import tiny_config

IMAGENET_MEAN = (0.485, 0.456, 0.406)
TV_NAME = "mobilenet_v3_small"  # the smallest torchvision classifier with a Linear head (2.5M)
TIMM_NAME = "mobilenetv3_small_050"  # timm's smallest (1.6M)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torchvision download cache; returns its checkpoints folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    folder = tmp_path / "torch_home" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


def _cache_torchvision_weights(folder: Path, weights_name: str = "IMAGENET1K_V1") -> dict:
    """Put a torchvision-format state dict where torchvision's download would have left it."""
    torch.manual_seed(1)
    state = torchvision.models.get_model(TV_NAME, weights=None).state_dict()
    weights = torchvision.models.get_model_weights(TV_NAME)[weights_name]
    torch.save(state, folder / Path(weights.url).name)
    return state


def _same(a: dict, b: dict, skip: str = "") -> bool:
    keys = [k for k in a if not (skip and k.startswith(skip))]
    return all(torch.equal(a[k], b[k]) for k in keys)


class Evil:
    """Unpickling this creates a marker file: proof that a loader executed the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _evil_file(path: Path, marker: Path) -> Path:
    torch.save({"model": {"w": torch.zeros(1)}, "payload": Evil(marker)}, path)
    return path


def _assert_pickle_is_live(path: Path, marker: Path) -> None:
    """The test file really would run code when unpickled unsafely."""
    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.exists()


# --- torchvision:<name>[:<weights>] ------------------------------------------------------

def test_torchvision_weights_load_offline_from_the_cache_with_a_fresh_head(torch_home):
    saved = _cache_torchvision_weights(torch_home)
    model = create_model(f"torchvision:{TV_NAME}", num_classes=10, mean=(0.5,) * 3,
                         std=(0.2,) * 3)
    loaded = pretrained.apply_init(model, f"torchvision:{TV_NAME}:IMAGENET1K_V1")
    assert loaded.source == f"torchvision:{TV_NAME}:IMAGENET1K_V1"
    assert "head replaced" in loaded.note and "1000" in loaded.note and "10" in loaded.note
    net = model.net.state_dict()
    assert _same(saved, net, skip="classifier.3")                    # body: the cached weights
    assert model.net.classifier[3].out_features == 10                 # head: fresh, 10 classes
    # normalisation comes with the weights: the model still takes [0,1] pixels
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor(IMAGENET_MEAN))


def test_torchvision_default_weights_same_classes_keep_the_head(torch_home):
    saved = _cache_torchvision_weights(torch_home)  # DEFAULT is IMAGENET1K_V1 for this model
    model = pretrained.load_pretrained(f"torchvision:{TV_NAME}", num_classes=1000)
    assert _same(saved, model.net.state_dict())  # every weight, the head included
    x = torch.rand(2, 3, 64, 64)
    reference = torchvision.models.get_model(TV_NAME, weights="DEFAULT").eval()
    normalized = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / \
        torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), reference(normalized))
    assert model.features(x).shape == (2, 1024)  # the head's input (Fig 3 reads it)


def test_torchvision_unsafe_cached_file_is_refused_and_not_executed(torch_home, tmp_path):
    weights = torchvision.models.get_model_weights(TV_NAME)["IMAGENET1K_V1"]
    marker = tmp_path / "executed"
    path = _evil_file(torch_home / Path(weights.url).name, marker)
    with pytest.raises(CheckpointError, match="full pickle"):
        pretrained.load_pretrained(f"torchvision:{TV_NAME}", num_classes=10)
    assert not marker.exists()
    _assert_pickle_is_live(path, marker)


def test_torchvision_bad_names_are_one_line_errors(torch_home):
    with pytest.raises(ConfigError, match="unknown torchvision model 'resnet51'"):
        pretrained.apply_init(create_model("cnn-small", num_classes=10), "torchvision:resnet51")
    with pytest.raises(ConfigError, match="unknown weights 'V9'.*IMAGENET1K_V1"):
        pretrained.load_pretrained(f"torchvision:{TV_NAME}:V9", num_classes=10)


def test_torchvision_resnet50_weights_fit_the_suites_resnet50(torch_home):
    """Table 3: `--arch resnet50` (ours, torchvision's keys) takes torchvision's ResNet-50."""
    torch.manual_seed(2)
    saved = torchvision.models.resnet50().state_dict()
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    torch.save(saved, torch_home / Path(weights.url).name)
    model = create_model("resnet50", num_classes=10, mean=(0.5,) * 3, std=(0.2,) * 3)
    loaded = pretrained.apply_init(model, "torchvision:resnet50:IMAGENET1K_V1", arch="resnet50")
    assert "'fc' is freshly initialised" in loaded.note
    assert _same(saved, model.net.state_dict(), skip="fc.")


# --- timm:<name>[:<file>] -----------------------------------------------------------------

def test_timm_weights_from_a_local_file_with_a_fresh_head(tmp_path):
    import timm

    torch.manual_seed(3)
    saved = timm.create_model(TIMM_NAME, pretrained=False).state_dict()
    file = tmp_path / "timm_weights.pth"
    torch.save(saved, file)
    model = pretrained.load_pretrained(f"timm:{TIMM_NAME}:{file}", num_classes=7)
    assert model.net.get_classifier().out_features == 7
    assert _same(saved, model.net.state_dict(), skip="classifier.")
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert model.features(torch.rand(2, 3, 64, 64)).shape == (2, 1024)
    assert pretrained.implied_arch("timm:resnet50.fb_swsl_ig1b_ft_in1k") == "timm:resnet50"


def test_timm_unsafe_file_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "executed"
    path = _evil_file(tmp_path / "evil.pth", marker)
    with pytest.raises(CheckpointError, match="full pickle"):
        pretrained.load_pretrained(f"timm:{TIMM_NAME}:{path}", num_classes=10)
    assert not marker.exists()
    _assert_pickle_is_live(path, marker)


def test_a_timm_state_dict_file_loads_into_the_timm_architecture(tmp_path):
    import timm

    saved = timm.create_model(TIMM_NAME, pretrained=False, num_classes=10).state_dict()
    file = tmp_path / "finetuned.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in saved.items()}}, file)  # DDP, timm
    model = pretrained.load_pretrained(str(file), 10, arch=f"timm:{TIMM_NAME}")
    assert _same(saved, model.net.state_dict())


# --- a checkpoint file, run:<id> ----------------------------------------------------------

def test_our_checkpoint_and_run_id_load_the_same_weights(tmp_path):
    cfg = tiny_config(tmp_path, epochs=1)
    runner.train_run(cfg, quiet=True)
    ckpt = results.run_dir(cfg.results_dir, cfg.run_path) / "checkpoint.pt"
    expected = results.safe_load(ckpt)["model"]

    def fresh():
        return build_model(cfg, dataset_info(cfg.dataset))

    from_file, from_run = fresh(), fresh()
    a = pretrained.apply_init(from_file, str(ckpt))
    b = pretrained.apply_init(from_run, f"run:{cfg.run_path}", results_dir=tmp_path)
    assert a.source == b.source == str(ckpt) and a.note == b.note == ""
    assert _same(expected, from_file.state_dict()) and _same(expected, from_run.state_dict())
    with pytest.raises(CheckpointError, match="no checkpoint"):
        pretrained.apply_init(fresh(), "run:smoke/test/nothing/seed0", results_dir=tmp_path)


def test_a_plain_state_dict_file_with_another_class_count_gets_a_fresh_head(tmp_path):
    torch.manual_seed(4)
    source = create_model("cnn-small", num_classes=10, in_channels=1, width=4)
    file = tmp_path / "net.pt"
    torch.save(source.net.state_dict(), file)  # bare network keys, no normalisation
    model = create_model("cnn-small", num_classes=3, in_channels=1, width=4, mean=(0.3,),
                         std=(0.4,))
    note = pretrained.apply_init(model, str(file)).note
    assert "10 classes, the model 3" in note
    assert _same(source.net.state_dict(), model.net.state_dict(), skip="classifier.")
    assert model.normalize.mean.item() == pytest.approx(0.3)  # the model keeps its own


def test_another_architecture_is_one_line_with_key_counts(tmp_path):
    file = tmp_path / "wide.pt"
    torch.save(create_model("cnn-small", num_classes=10, in_channels=1, width=8).state_dict(), file)
    model = create_model("cnn-small", num_classes=10, in_channels=1, width=4)
    with pytest.raises(CheckpointError) as e:
        pretrained.apply_init(model, str(file), arch="cnn-small")
    message = str(e.value)
    assert "\n" not in message and "does not fit architecture cnn-small" in message
    # stem, conv2 and the hidden Linear weights, and both BatchNorms (4 tensors each)
    assert "0 missing, 0 unexpected and 11 differently shaped keys" in message


def test_full_model_pickle_file_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "executed"
    path = _evil_file(tmp_path / "model.pt", marker)
    with pytest.raises(CheckpointError, match="refused, it is a full pickle") as e:
        pretrained.apply_init(create_model("cnn-small", num_classes=10), str(path))
    assert "\n" not in str(e.value)
    assert not marker.exists()
    _assert_pickle_is_live(path, marker)


def test_unknown_prefix_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown prefix 'hf-hub:'.*torchvision:<name>"):
        pretrained.apply_init(create_model("cnn-small", num_classes=10), "hf-hub:timm/resnet50")
    code = main(["finetune", "--init", "s3:bucket/model.pt", "--results-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "unknown prefix 's3:'" in err and "\n" not in err


# --- through the runner -------------------------------------------------------------------

def _write_cifar10(root: Path, n: int = 64) -> None:
    """A tiny CIFAR-10 in torchvision's python-pickle format."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = torch.randint(0, 256, (n, 3072), generator=g, dtype=torch.uint8).numpy()
        labels = torch.randint(0, 10, (n,), generator=g).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)


def test_finetune_from_torchvision_records_the_replaced_head(torch_home, tmp_path):
    _cache_torchvision_weights(torch_home)
    _write_cifar10(tmp_path / "data")
    cfg = tiny_config(tmp_path / "store", method="aft", dataset="cifar10",
                      data_root=str(tmp_path / "data"), arch=f"torchvision:{TV_NAME}",
                      model_args={}, init=f"torchvision:{TV_NAME}", batch_size=16, epochs=1,
                      max_steps=2, method_args={"steps": 1}, eval_n=8, monitor_n=0)
    record = runner.train_run(cfg, quiet=True)
    assert record["status"] == "done"
    assert record["pretrain_source"] == f"torchvision:{TV_NAME}:IMAGENET1K_V1"
    assert "head replaced: the weights have 1000 classes, the model 10" in record["init_note"]


def test_finetune_cli_takes_the_architecture_from_the_init(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(runner, "train_run", lambda cfg, **kw: seen.setdefault("cfg", cfg) and {})
    monkeypatch.setattr("paper_repro.cli.train._report", lambda record, select="final": None)
    main(["finetune", "--init", "torchvision:resnet50:IMAGENET1K_V1", "--dataset", "cifar10",
          "--results-dir", str(tmp_path)])
    assert seen["cfg"].arch == "torchvision:resnet50" and seen["cfg"].method == "aft"
