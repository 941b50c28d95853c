"""One analysis everywhere: `deepscope doctor`, `deepscope train` (the Diagnose callback) and `watch` in a
plain loop find the same kinds on the same config, the same model, data and number of steps."""
import json

import pytest
import torch

from conftest import write_tiny_dataset
from deepscope import watch
from deepscope.cli import main
from deepscope.config import TrainConfig
from deepscope.data import image_dls
from deepscope.diagnose import problems
from deepscope.recipe import build_model, make_optimizer_factory
from deepscope.seed import set_seed

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, BS, N_TRAIN = 32, 32, 512  # two epochs of 16 batches
COMMON = ["--no-verify", "--nfs", "4", "8", "--threads", "1", "--batch-size", str(BS), "--schedule", "constant"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data"), n_train=N_TRAIN, n_test=64)


def kinds(findings):
    """(root causes, every problem kind) of a list of findings; every other problem is explained by a root."""
    found = problems(findings)
    roots = sorted({f.kind for f in found if not f.caused_by})
    assert all(f.caused_by in roots for f in found if f.caused_by), findings
    return roots, sorted({f.kind for f in found})


def from_file(path):
    from deepscope.diagnose import Finding

    return [Finding.from_dict(d) for d in json.loads(path.read_text())]


def watched(data, options):
    """The same config trained for STEPS steps by a plain loop under `watch`."""
    cfg = {"norm": "batch", "lr": 1e-2}
    for flag, value in zip(options[::2], options[1::2]):
        cfg[flag.lstrip("-")] = float(value) if flag == "--lr" else value
    config = TrainConfig(data_dir=str(data), nfs=(4, 8), batch_size=BS, schedule="constant", verify=False,
                         norm=cfg["norm"], lr=cfg["lr"])
    set_seed(config.seed)
    dls = image_dls(config.dataset, config.data_dir, config.batch_size, seed=config.seed, verify=False)
    model = build_model(config, dls.n_classes)
    opt = make_optimizer_factory(config)(model.parameters(), config.lr)
    with watch(model, opt) as w:
        step = 0
        while step < STEPS:
            for xb, yb in dls.train:
                loss = torch.nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step()
                opt.zero_grad()
                w.step(loss, targets=yb)
                step += 1
                if step == STEPS:
                    break
    return w.findings()


@pytest.mark.parametrize("options, root", [
    (["--norm", "none", "--lr", "0.6"], ["lr_too_high"]),   # lesson 10's plain CNN at a learning rate too high
    (["--lr", "1e-6"], ["lr_too_low"]),                      # steps too small to move the weights
    (["--lr", "3e-3"], []),                                  # a healthy set-up
])
def test_doctor_train_and_watch_find_the_same_kinds(data, tmp_path, options, root):
    assert main(["doctor", "--data-dir", str(data), *COMMON, *options, "--steps", str(STEPS),
                 "--out", str(tmp_path / "doctor")]) == 0
    code = main(["train", "--data-dir", str(data), "--quiet", *COMMON, *options, "--epochs", str(STEPS * BS // N_TRAIN),
                 "--out", str(tmp_path / "train"), "--no-report"])  # the findings are compared, not the report
    assert code in (0, 1)  # 1: the training itself failed (NaN), which diagnosis then explains
    doctor = kinds(from_file(tmp_path / "doctor" / "findings.json"))
    train = kinds(from_file(tmp_path / "train" / "findings.json"))
    plain = kinds(watched(data, options))
    # the same root causes; their symptoms (dead layers, collapsed activations) sit near their thresholds,
    # so which of them each run crossed may differ, but every one is listed under the cause
    assert doctor[0] == train[0] == plain[0] == root, (doctor, train, plain)
