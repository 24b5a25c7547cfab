"""The position probe reads a patch's row and column back from tower layers that carry them, and reports chance
for layers that do not."""

import json

import pytest
import torch

from vtoken.cli import main
from vtoken.evals.shapes import hard as shapes_hard
from vtoken.evals.shapes import model as sm
from vtoken.evals.shapes import training as ts
from vtoken.evals.shapes.probe import position_probe


@pytest.fixture(scope="module")
def tiny_hard():
    processor = sm.build_processor(shapes_hard.vocabulary())
    return sm.build_model(processor, **ts.TINY).eval(), processor


def test_the_probe_reads_position_from_the_sine_cosine_codes_and_reports_chance_without_them(tiny_hard):
    model, processor = tiny_hard
    results, chance = position_probe(model, processor, shapes_hard, scenes=6)
    assert [r.layer for r in results] == ["embeddings", "block 1", "projected"]
    assert 3.0 < chance < 4.0  # rows 0-13, uniform: 3.5
    embeddings = results[0]
    assert max(embeddings.row_error, embeddings.col_error) < 0.5 * chance

    with torch.no_grad():  # the same tower with its position codes removed
        table = model.model.vision_tower.embeddings.position_embedding.weight
        saved = table.clone()
        table.zero_()
        try:
            blind, _ = position_probe(model, processor, shapes_hard, scenes=6)
        finally:
            table.copy_(saved)
    assert min(blind[0].row_error, blind[0].col_error) > 0.8 * chance


def test_the_probe_needs_two_scenes(tiny_hard):
    with pytest.raises(ValueError, match=r"scenes must be an int >= 2 .*got 1"):
        position_probe(*tiny_hard, shapes_hard, scenes=1)


def test_probe_position_command_prints_and_writes_the_table(tiny_hard, tmp_path, capsys):
    model, processor = tiny_hard
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    out = tmp_path / "probe.json"
    assert main(["probe-position", "--task", "hard", "--model", str(tmp_path / "model"), "--scenes", "4",
                 "--threads", "1", "--json", str(out)]) == 0
    assert "embeddings" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert [layer["layer"] for layer in written["layers"]] == ["embeddings", "block 1", "projected"]
    with pytest.raises(SystemExit):
        main(["probe-position", "--task", "hard", "--model", str(tmp_path / "model"), "--scenes", "1"])
