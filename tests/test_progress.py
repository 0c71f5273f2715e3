"""Progress bars (torchmerge.progress): forced on, forced off, auto (quiet under pytest), no tqdm."""
import ast
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import torchmerge as tm
from torchmerge import progress
from torchmerge.errors import TorchMergeError


def _experts(n=2):
    out = []
    for i in range(n):
        torch.manual_seed(i)
        out.append(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                 nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval())
    return out


def _data(n=2):
    gen = torch.Generator().manual_seed(0)
    return [[torch.randn(8, 3, 6, 6, generator=gen) for _ in range(2)] for _ in range(n)]


def _merge(**kw):
    return tm.merge(_experts(), method="regmean", data=_data(), align="weight", correction="affine", **kw)


STAGES = ["discover", "align weight: expert 1 sweep", "regmean: expert 0 Grams", "regmean: expert 1 Grams",
          "regmean: solve", "calibrate affine: task0 pass 1 (expert + merged)",
          "calibrate affine: task1 pass 2"]


def test_forced_on_writes_bars_naming_the_stages(capsys):
    pytest.importorskip("tqdm")
    _merge(progress=True)
    err = capsys.readouterr().err
    for name in STAGES:
        assert name in err, (name, err[-2000:])


@pytest.mark.parametrize("setting", [False, None])
def test_off_and_auto_under_pytest_write_nothing(capsys, setting):
    _merge(progress=setting)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_align_and_calibrate_take_progress(capsys):
    pytest.importorskip("tqdm")
    experts, data = _experts(), _data()
    spec = tm.discover(experts[0], data[0][0])
    tm.align(experts[0], experts[1], spec, progress=True)
    merged = tm.merge(experts, method="average", align=None, correction=None, example_inputs=data[0][0])
    tm.calibrate(merged, experts, data, mode="repair", progress=True)
    err = capsys.readouterr().err
    assert "align weight: sweep" in err and "calibrate repair: pass 1" in err


def test_without_tqdm_progress_true_warns_once_and_runs(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = _merge(progress=True)
    about_tqdm = [w for w in caught if "tqdm" in str(w.message)]
    assert len(about_tqdm) == 1, [str(w.message) for w in caught]
    assert merged(torch.randn(2, 3, 6, 6), task=1).shape == (2, 3)
    assert capsys.readouterr().err == ""


def test_invalid_setting_is_rejected():
    with pytest.raises(TorchMergeError, match="progress"):
        _merge(progress="yes")


def test_stage_names_inner_bars_and_the_outermost_wins():
    with progress.stage("outer"), progress.stage("inner"):
        assert progress._STAGE.get() == "outer"
    assert progress._STAGE.get() is None
    with progress.using(False):
        with progress.bar(None, "manual", total=2) as b:  # the silent stand-in
            b.update()
        assert list(progress.bar(range(3), "x")) == [0, 1, 2]


def test_no_module_imports_tqdm_at_import_time():
    # (torch.hub imports tqdm itself when installed, so sys.modules cannot tell)
    for path in Path(tm.__file__).parent.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] == "tqdm" for n in names), path
