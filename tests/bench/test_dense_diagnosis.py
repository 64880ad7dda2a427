import re
import sys

from adclr.config import Config
from adclr.train import train
from bench import dense_diagnosis


def test_every_probe_reports_a_score(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    train(Config(out=str(out), data="builtin:grey-ground-scenes", arch="vit_test", patch_size=8,
                 image_size=32, local_size=16, num_local_crops=1, num_queries=2, out_dim=64,
                 head_hidden_dim=32, head_bottleneck_dim=16, batch_size=4, max_steps=1,
                 warmup_epochs=0, warmup_teacher_temp_epochs=0, freeze_last_layer_epochs=0,
                 num_workers=0, log_every=1, device="cpu"))
    monkeypatch.setattr(sys, "argv", ["dense_diagnosis", str(out / "checkpoint.pt"), "--data",
                                      "builtin:grey-ground-scenes", "--images", "24"])
    dense_diagnosis.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("every patch right (4 x 4)")
    assert any(l.startswith("object against background") for l in lines)
    assert lines[-1].startswith("image class from the mean patch token")
    assert len(lines) == 9, lines
    for line in lines:
        first = float(re.search(r": [a-zA-Z' ]*?(\d+\.\d)", line).group(1))
        assert 0.0 <= first <= 100.0, line
    # Labels at the patch grid name most pixels right: far above any score of 0.
    assert float(lines[0].rsplit(" ", 1)[1]) > 30.0
